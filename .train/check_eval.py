import numpy as np, collections
from sd.demo.data import make_sample, held_out_prompts, render, ShapeSpec, SHAPES, SIZES
from sd.demo.evaluate import analyze, score
stats=collections.defaultdict(list); bad=0; n=0
for i in range(2000):
    s=make_sample(i)
    if len(s.shapes)!=1: continue
    a=analyze(s.image); t=s.shapes[0]; n+=1
    stats[(t.shape,t.size)].append((a.extent,a.solidity))
    ok = a.color==t.color and a.background==s.background and a.shape==t.shape and a.position==t.position
    if not ok: bad+=1; print(s.caption, a) if bad<10 else None
print("bad",bad,"of",n)
for k,v in sorted(stats.items()):
    v=np.array(v); print(k, v.min(0).round(3), v.max(0).round(3))
for p,t,b in held_out_prompts(): print(p)
