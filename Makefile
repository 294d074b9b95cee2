# Every target that needs Python depends on $(VENV_STAMP), so each works alone on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.installed
OUT ?= build/export
HEIGHT ?= 1024
WIDTH ?= 1536
NAFNET_CKPT ?=
# The depth net to fuse (models/depth.py): dpt-hybrid (the paper's), dpt-large, midas-small,
# depth-anything-v2-small; empty: the net DEPTH_WEIGHTS is, else dpt-hybrid. DPT_WEIGHTS is the
# old name of DEPTH_WEIGHTS.
DEPTH ?=
DPT_WEIGHTS ?=
DEPTH_WEIGHTS ?= $(DPT_WEIGHTS)
EXPORT_ARGS ?=
CALIB_DIR ?=
CALIB_SAMPLES ?= 8
# The quantized variants: unset, the defaults of the one variant table (export/variants.py;
# `bokeh variants` prints it); QUANT_VARIANTS= for none, or a list, e.g. drq,int8,int16x8.

# setup-gpu: optional, never needed by make export (docs/design.md, section 9).
.PHONY: setup setup-gpu test export bench bench-fp16 bench-depth bench-runtime bench-passes bench-peers litert-torch-env lint clean train

$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(VENV_STAMP)

# A GPU backend without a GPU: LiteRT's GPU accelerator (WebGPU) runs on SwiftShader, the software
# Vulkan device in Debian's chromium package. Optional: the export never needs it; with it the
# export runs every float file once on the GPU accelerator and make test runs the GPU tests.
# chromium only recommends the Vulkan loader (libvulkan1), so it is named here: without it Dawn
# finds no adapter. The target fails when no device results, so a CI that asks for the GPU path
# cannot go green without it (docs/design.md, section 9).
GPU_PACKAGES := chromium libvulkan1
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
setup-gpu: $(VENV_STAMP)
	@if command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) \
		apt-get install -y -q --no-install-recommends $(GPU_PACKAGES); \
	else echo "setup-gpu: no apt-get here; install a Vulkan loader and driver, or SwiftShader"; fi
	@$(BIN)/python -c "import sys; from export.accelerator import gpu_device; ok, d = gpu_device(); \
		print('GPU device: ' + d if ok else 'setup-gpu: error: no GPU device: ' + d); \
		sys.exit(0 if ok else 1)"

# Two workers (pytest-xdist): most of the suite is single-threaded conversion work, so two cores
# halve it; tests/conftest.py keeps the session export and each module's fixtures in one worker.
TEST_WORKERS ?= 2
test: $(VENV_STAMP)
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup

# The fused photo -> bokeh model (and NAFNet alone beside it), then parity of every file the
# export's report.json lists, in one process (one PyTorch reference per net).
# EXPORT_ARGS=--controls adds bokeh_controls_*.tflite (focus and strength inputs, issue #14).
export: $(VENV_STAMP)
	$(BIN)/bokeh export --export-dir $(OUT) --overwrite --height $(HEIGHT) --width $(WIDTH) \
		$(if $(NAFNET_CKPT),--checkpoint $(NAFNET_CKPT)) \
		$(if $(DEPTH),--depth $(DEPTH)) \
		$(if $(DEPTH_WEIGHTS),--depth-weights $(DEPTH_WEIGHTS)) \
		$(if $(filter undefined,$(origin QUANT_VARIANTS)),,--quant-variants '$(QUANT_VARIANTS)') \
		--calib-samples $(CALIB_SAMPLES) \
		$(if $(CALIB_DIR),--calib-dir $(CALIB_DIR)) \
		$(EXPORT_ARGS)
	$(BIN)/bokeh parity --export-dir $(OUT) --num-random 1
	@# What a phone GPU computes (fp16 arithmetic, docs/design.md sections 12-13): the graphs are
	@# fp16-safe, so a failure here fails the target like any other parity failure.
	$(BIN)/bokeh parity --tflite $(OUT)/bokeh_fp16.tflite --num-random 1 --tflite-only \
		--arithmetic fp16
	@echo "TFLite models: $$(ls $(OUT)/*.tflite | grep -v _calibrated.tflite | tr '\n' ' ')"
	@if [ -f $(OUT)/bokeh_calibrated.tflite ]; then echo "Calibration ranges (not a phone" \
		"model; re-quantization reuses them): $(OUT)/bokeh_calibrated.tflite"; fi
	@echo "Report: $(OUT)/report.txt"

bench: $(VENV_STAMP)
	$(BIN)/bokeh bench --export-dir $(OUT) --height $(HEIGHT) --width $(WIDTH) \
		--doc docs/benchmarks.md
	$(MAKE) bench-fp16

# The fp16 arithmetic table (issue 19): every depth net fused, random and stress weights, fp32 and
# fp16 files under fp16 and fp16-acc16 arithmetic (export/arith.py), on the five bench photos;
# then what the fp16-safe forms cost the fp32 CPU path (each part built both ways, timed side by
# side; needs the export in OUT for NAFNet's ONNX). FP16_BENCH_ARGS: e.g. --photos 1
# --depth-short-side 128, or --nets midas-small --policies fp16 --section fp16-part.
FP16_BENCH_ARGS ?=
bench-fp16: $(VENV_STAMP)
	$(BIN)/python -m validate.fp16_bench --height $(HEIGHT) --width $(WIDTH) \
		--doc docs/benchmarks.md $(FP16_BENCH_ARGS)
	$(BIN)/python -m validate.fp16_speed --export-dir $(OUT) --doc docs/benchmarks.md

# The depth-net table alone (also part of bench): every official depth net fused at
# HEIGHTxWIDTH, one export each in build/bench-depth/NAME, timed against NAFNet alone and PyTorch.
bench-depth: $(VENV_STAMP)
	$(BIN)/python -m validate.bench --depth-table --height $(HEIGHT) --width $(WIDTH) \
		--doc docs/benchmarks.md

# Every engine of the export (PyTorch, onnxruntime, each TFLite at 1/2/4 threads, XNNPACK on/off):
# table, OUT/runtime.json and OUT/runtime.png.
bench-runtime: $(VENV_STAMP)
	$(BIN)/bokeh runtime --tflite $(OUT)/nafnet_fp32.tflite

# Each export rewrite pass measured: TFLite with the first k passes, timed interleaved.
bench-passes: $(VENV_STAMP)
	$(BIN)/bokeh passes --export-dir $(OUT) --out build/passes

# onnx2tf pins TensorFlow 2.19, so it gets its own environment; its TFLite runs on ours.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --disable-pip-version-check onnx2tf==1.29.24 \
		'tensorflow==2.19.*' 'tf-keras~=2.19.0' 'onnx>=1.17,<1.20' 'onnxruntime>=1.20' \
		onnx_graphsurgeon sng4onnx psutil ai-edge-litert h5py protobuf 'numpy<2.2'
	touch $@

# litert-torch (Google's PyTorch -> LiteRT converter) brings its own converter stack, so it gets
# its own environment too. torch is pinned to 2.13.0, the CPU wheel on this disk and the version
# our .venv pickles the reference modules with (litert-torch 0.10.0 takes torch >= 2.4, < 2.15;
# an unpinned torch pulls a multi-GB CUDA build). About 2.1 GB and under a minute to install.
LITERT_TORCH_VENV := .venv-litert-torch
LITERT_TORCH_STAMP := $(LITERT_TORCH_VENV)/.installed
$(LITERT_TORCH_STAMP):
	$(PYTHON) -m venv $(LITERT_TORCH_VENV)
	$(LITERT_TORCH_VENV)/bin/pip install --quiet --disable-pip-version-check litert-torch==0.10.0 \
		torch==2.13.0 litert-converter==0.5.0 ai-edge-litert==2.3.0
	touch $@

litert-torch-env: $(LITERT_TORCH_STAMP)

bench-peers: $(VENV_STAMP) $(PEERS_STAMP) $(LITERT_TORCH_STAMP)
	@test -f $(OUT)/nafnet_fp32.tflite || $(MAKE) export
	$(BIN)/python -m validate.peers --export $(OUT) --peers build/peers --venv $(PEERS_VENV) \
		--litert-torch-venv $(LITERT_TORCH_VENV) --doc docs/benchmarks.md

lint: $(VENV_STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf build .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The quick preset on synthetic scenes, on the CPU: a few minutes, ends with an identity-vs-trained
# table and $(TRAIN_OUT)/nafnet.pt for `make export NAFNET_CKPT=$(TRAIN_OUT)/nafnet.pt`.
TRAIN_OUT ?= build/train
TRAIN_ARGS ?=
train: $(VENV_STAMP)
	$(BIN)/python -m train.trainer --preset quick --device cpu --out $(TRAIN_OUT) --overwrite \
		--allow-random-vgg $(TRAIN_ARGS)
