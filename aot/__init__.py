"""`pdlm-aot`: compile the real inference or training program for hardware we do not have, and say if it fits.

It compiles training's step (`train.step.Trainer`), so it sits above `train` and outside the library.
"""
