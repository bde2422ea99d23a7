import time, torch
from sd.config import VAEConfig, UNetConfig
from sd.vae import AutoencoderKL
from sd.unet import UNetModel
torch.manual_seed(0)
def bench(name, model, fn, n=3):
    opt=torch.optim.AdamW(model.parameters(), 1e-4)
    for i in range(n+1):
        if i==1: t=time.time()
        loss=fn(); opt.zero_grad(); loss.backward(); opt.step()
    print(name, sum(p.numel() for p in model.parameters())/1e6, "M params", (time.time()-t)/n, "s/step", flush=True)
for cfg in [VAEConfig(ch=32, ch_mult=(1,2,2,4), num_res_blocks=1), VAEConfig(ch=32, ch_mult=(1,1,2,2), num_res_blocks=1), VAEConfig(ch=64, ch_mult=(1,1,2,2), num_res_blocks=1)]:
    v=AutoencoderKL(cfg); x=torch.randn(32,3,64,64)
    bench(str(cfg.ch)+str(cfg.ch_mult), v, lambda: (v.decode(v.encode(x))-x).abs().mean())
for mc, mult, nrb in [(64,(1,2),1),(64,(1,2),2),(96,(1,2),1),(128,(1,2),1),(64,(1,2,2),1)]:
    cfg=UNetConfig(model_channels=mc, channel_mult=mult, num_res_blocks=nrb, transformer_depth=(1,)*len(mult), context_dim=128)
    u=UNetModel(cfg); x=torch.randn(128,4,8,8); c=torch.randn(128,77,128); t=torch.rand(128)*999
    bench(f"unet {mc} {mult} {nrb}", u, lambda: (u(x,t,c)-x).pow(2).mean())
