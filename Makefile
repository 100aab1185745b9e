# minidit: `make analyze` runs the redundancy analysis, `make test` the test suite.
PYTHON ?= python
MODEL ?= flux-tiny
ARGS ?=
# Set TORCH_VERSION to pin torch at install time (CI uses the CPU build 2.13.0); unset keeps your own torch.
TORCH_VERSION ?=

.PHONY: install install-reference test test-portable mutants tolerances analyze bench caching fixtures train-tiny

install:
	$(if $(TORCH_VERSION),$(PYTHON) -m pip install "torch==$(TORCH_VERSION)")
	$(PYTHON) -m pip install -e ".[test]"

install-reference:  # the reference oracles (diffusers, transformers) for live parity tests and fixtures
	$(if $(TORCH_VERSION),$(PYTHON) -m pip install "torch==$(TORCH_VERSION)")
	$(PYTHON) -m pip install -e ".[test,reference]"

test:
	$(PYTHON) -m pytest -q

# The suite again as another CPU computes it: torch's scalar kernels instead of AVX2/AVX-512, numpy's SIMD
# dispatch off (its baseline stays), reference oracles hidden. Stored fixtures must pass here too; the tests marked
# any_cpu (structure and in-process equalities: nothing a CPU's kernels can change) ran in `make test`.
test-portable:
	ATEN_CPU_CAPABILITY=default MINIDIT_LIVE=0 \
	NPY_DISABLE_CPU_FEATURES="$$($(PYTHON) -c "import numpy as np; m = getattr(np, '_core', None) or np.core; print(' '.join(m._multiarray_umath.__cpu_dispatch__))")" \
	$(PYTHON) -m pytest -q -m "not any_cpu" $(ARGS)

mutants:  # realistic one-point bugs that the stored-fixture tests must catch (not part of CI: about 13 minutes)
	$(PYTHON) -u tests/mutants.py $(ARGS)

tolerances:  # the worst fixture error of every test under each CPU capability this machine offers (about 20 minutes)
	$(PYTHON) -u tests/measure_tolerances.py $(ARGS)

analyze:
	$(PYTHON) analyze.py --model $(MODEL) --resume --save-images $(ARGS)

bench:
	$(PYTHON) -u tests/bench.py $(ARGS)

caching:  # the README's table of caching plans on flux-tiny and dit-tiny, from scratch (about 40 minutes)
	$(PYTHON) -u tests/caching_evidence.py $(ARGS)

fixtures:  # regenerate tests/fixtures from the reference implementations (needs install-reference)
	$(PYTHON) tests/reference/generate.py
	$(PYTHON) tests/reference/generate_vae.py
	$(PYTHON) tests/reference/generate_t5.py
	$(PYTHON) tests/reference/generate_dpm_solver.py
	$(PYTHON) tests/reference/generate_pixart.py  # after t5 and dpm_solver: it reuses their files
	$(PYTHON) tests/reference/generate_mmdit.py
	$(PYTHON) tests/reference/generate_flow.py
	$(PYTHON) tests/reference/generate_clip.py
	$(PYTHON) tests/reference/generate_clip_tokenizer.py  # pip-downloads open_clip_torch for OpenAI's BPE merges
	$(PYTHON) tests/reference/generate_flux_pipeline.py  # after clip, clip_tokenizer, t5, flow
	$(PYTHON) tests/reference/generate_sd3_pipeline.py  # after generate_flux_pipeline: reuses its writers
	$(PYTHON) tests/reference/generate_captures.py  # after generate, generate_pixart, generate_mmdit: reads their weights
	$(PYTHON) tests/reference/generate_latte.py  # after generate_pixart and t5: reuses their writers and tiny T5
	$(PYTHON) tests/reference/generate_cogvideox.py  # after t5: reuses the tiny T5 and tokenizer
	$(PYTHON) tests/reference/generate_mochi.py
	$(PYTHON) tests/reference/generate_mochi_pipeline.py  # after mochi and t5: reuses their files (--genmo-src DIR: see it)
	$(PYTHON) tests/reference/generate_opensora.py  # after t5; needs OPENSORA_REPO=<a clone of hpcaitech/Open-Sora> and timm==0.9.16 (--no-deps)
	$(PYTHON) tests/reference/generate_captions.py  # needs OPENSORA_REPO too, and ftfy and beautifulsoup4 (the reference extra)

train-tiny:  # retrain an embedded model, weights/$(MODEL): flux-tiny (28 min + 1.5 to export and measure) or dit-tiny (25)
	$(PYTHON) -m minidit.train_tiny --model $(MODEL)
