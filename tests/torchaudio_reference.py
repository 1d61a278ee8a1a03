"""Run by .venv-torchaudio's python, not by pytest: resamples each signal of an .npz with
torchaudio's `functional.resample` (its defaults) and writes the results to another .npz.

    python torchaudio_reference.py IN.npz OUT.npz

IN holds `signal_<i>` arrays [..., T] and `rates_<i>` = [orig, new]; OUT holds `out_<i>`.
"""

import sys

import numpy as np
import torch
import torchaudio.functional

source, target = sys.argv[1:]
with np.load(source, allow_pickle=False) as inputs:
    count = len([name for name in inputs.files if name.startswith("signal_")])
    results = {}
    for i in range(count):
        orig, new = (int(rate) for rate in inputs[f"rates_{i}"])
        signal = torch.from_numpy(inputs[f"signal_{i}"])
        results[f"out_{i}"] = torchaudio.functional.resample(signal, orig, new).numpy()
np.savez(target, **results)
