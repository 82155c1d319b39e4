import torch
from frugallm.quant import kernels
d = torch.device("cuda")
print("torch", torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print("int8pack", kernels.int8pack_supported(d, 576), "int_mm", kernels._cuda_probe("int_mm", d))
lay = kernels.INT4_LAYOUTS["int4_cuda"]
print("int4 available", lay.available(d))
for k in (96, 192, 576, 1536):
    p = kernels.block_permutation("int4_cuda", k, d)
    print("int4_cuda block perm K", k, None if p is None else tuple(p.shape))
print("layout for 960x576 g32:", kernels.int4_layout_for(d, 960, 576, 32))
