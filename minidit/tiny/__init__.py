"""The embedded tiny models: procedural data (shapes.py), tokenizers built from their captions (tokenizers.py),
training and export (dit.py for dit-tiny, flux.py for flux-tiny) and flux-tiny's caption-accuracy check
(accuracy.py). `python -m minidit.train_tiny --model NAME` retrains one."""
