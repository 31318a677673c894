"""`autoep plan`: simulate a training step at cluster scale, on one machine, before paying for it."""
