"""Learnability probe: can a preset regress a single-image noise level? (diagnostic, CPU)

Crops of scikit-image retina (grey) with Gaussian noise of random strength; target 1 - severity.
Trains MedIQANet directly with Adam for STEPS steps (batch 16) on 48 crops and reports SRCC on
those and on 16 held-out crops. Used to separate "the architecture cannot learn" from "the
corpus task is harder than the budget" for the bundled model.

    python benchmarks/learnability_probe.py PRESET LR STEPS [SCORE_BIAS_INIT]
"""
import sys, time, numpy as np, torch
from skimage import data
from engines.models.registry import create_model
from engines.models.presets import get_preset
from engines.preprocess import preprocess_slice
from engines.prompts import DEFAULT_VOCAB, Prompt, encode_prompt
from engines.metrics import srcc
preset = sys.argv[1]; lr = float(sys.argv[2]); steps = int(sys.argv[3])
torch.manual_seed(0); rng = np.random.default_rng(0)
img = data.retina().astype(np.float32)[::3, ::3].mean(-1)
cfg = get_preset(preset).preprocess_config()
X, Y = [], []
for i in range(64):
    sev = rng.uniform(0, 1); y0 = rng.integers(0, img.shape[0]-300); x0 = rng.integers(0, img.shape[1]-300)
    crop = img[y0:y0+300, x0:x0+300]
    deg = crop + rng.normal(0, 40*sev, crop.shape)
    X.append(preprocess_slice(deg, "fundus", "grey", cfg)); Y.append(1 - sev)
X = torch.from_numpy(np.stack(X)); Y = torch.tensor(Y, dtype=torch.float32)
P = torch.from_numpy(np.stack([encode_prompt(Prompt("2d","fundus","eye","grey"))]*64))
m = create_model(preset, DEFAULT_VOCAB.size)
if len(sys.argv) > 4:  # start the ReLU score head at a chosen level (as training does)
    torch.nn.init.constant_(m.score_head[-2].bias, float(sys.argv[4]))
opt = torch.optim.Adam(m.parameters(), lr=lr)
t=time.time()
for s in range(steps):
    idx = torch.randint(0, 48, (16,))
    m.train(); q, _ = m(X[idx], P[idx]); loss = ((q - Y[idx])**2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if s % 25 == 0 or s == steps-1:
        m.eval()
        with torch.no_grad(): q,_ = m(X, P)
        print(s, f"loss {loss.item():.4f} train srcc {srcc(q[:48].numpy(), Y[:48].numpy()):.3f} heldout srcc {srcc(q[48:].numpy(), Y[48:].numpy()):.3f} std {q.std():.4f}", f"{time.time()-t:.0f}s", flush=True)
