"""sd: a from-scratch engine for the Stable Diffusion series (SD 1.x, 2.x, SDXL; SD3 later).

Layout (see ../shared/DESIGN.md): config (dataclasses), checkpoint (file reading), detect
(state dict -> ModelSpec), unet / vae / text (models named like the checkpoint keys),
conditioning, denoiser, guidance, schedules, samplers, pipeline (loaded models + generate).
"""
