"""More test-time views than the shipped 6, scored on the three shipped models: the logits of every
1-pixel shift (reflect padding) of each test image and of its mirror, combined with the weights of
each scheme below ("6 (shipped)" is ViewAverage's). Accuracy per seed and the mean.

    python bench/tta_views.py ../shared/cifar10 > bench/tta_views_cpu_2core.txt

The committed output was made by this script's first form (the same computation, no machine
line); its machine line was written by hand. Verdict: at most +0.03 over the 6 views, not shipped.
"""
import sys, torch, torch.nn.functional as F, numpy as np
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C
dev = torch.device('cpu'); dtype, _ = C.choose_format(dev, 'auto')
images, labels = C.load_cifar(sys.argv[1] if len(sys.argv) > 1 else 'data')['test']
def views(x):
    p = F.pad(x, (1,)*4, mode='reflect')
    ims = {'c': x, 'ul': p[..., :-2, :-2], 'dr': p[..., 2:, 2:], 'ur': p[..., :-2, 2:], 'dl': p[..., 2:, :-2],
           'u': p[..., :-2, 1:-1], 'd': p[..., 2:, 1:-1], 'l': p[..., 1:-1, :-2], 'r': p[..., 1:-1, 2:]}
    return ims
@torch.no_grad()
def logits_all(cnn):
    out = {}
    cnn.eval()
    for s in range(0, len(images), 500):
        x = C.to_float(images[s:s+500]).contiguous(memory_format=torch.channels_last)
        for k, v in views(x).items():
            for f in (0, 1):
                out.setdefault((k, f), []).append(cnn(v.flip(-1) if f else v).float())
    return {k: torch.cat(v) for k, v in out.items()}
schemes = {
 '6 (shipped)': {('c',0):1/4,('c',1):1/4,('ul',0):1/8,('ul',1):1/8,('dr',0):1/8,('dr',1):1/8},
 '10 diag': {**{('c',f):1/4 for f in (0,1)}, **{(k,f):1/16 for k in ('ul','dr','ur','dl') for f in (0,1)}},
 '10 diag uniform': {**{('c',f):1 for f in (0,1)}, **{(k,f):1 for k in ('ul','dr','ur','dl') for f in (0,1)}},
 '18 all': {**{('c',f):1/4 for f in (0,1)}, **{(k,f):1/32 for k in ('ul','dr','ur','dl','u','d','l','r') for f in (0,1)}},
 '10 axis': {**{('c',f):1/4 for f in (0,1)}, **{(k,f):1/16 for k in ('u','d','l','r') for f in (0,1)}},
}
res = {k: [] for k in schemes}
machine = C.machine_description(dev, dtype)
print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, {C.precision_name(dtype)}")
for s in range(3):
    cnn = C.load_cnn(C.MODEL_DIR / f'cnn_seed{s}.pt', dev, dtype).cnn
    L = logits_all(cnn)
    for name, w in schemes.items():
        z = sum(L[k]*v for k, v in w.items())
        res[name].append(100*(z.argmax(1) == labels).float().mean().item())
for k, v in res.items(): print(f'{k:18s}', ' '.join(f'{a:.2f}' for a in v), f'mean {np.mean(v):.3f}')
