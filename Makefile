# Every target that needs Python depends on $(VENV_STAMP), so each works alone on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.installed
OUT ?= build/export
HEIGHT ?= 1024
WIDTH ?= 1536
NAFNET_CKPT ?=
EXPORT_ARGS ?=

.PHONY: setup test export bench bench-runtime bench-passes bench-peers lint clean

$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(VENV_STAMP)

test: $(VENV_STAMP)
	$(BIN)/python -m pytest -q

export: $(VENV_STAMP)
	$(BIN)/bokeh-export --out $(OUT) --height $(HEIGHT) --width $(WIDTH) \
		$(if $(NAFNET_CKPT),--checkpoint $(NAFNET_CKPT)) $(EXPORT_ARGS)
	$(BIN)/validate parity --tflite $(OUT)/nafnet_fp32.tflite

bench: $(VENV_STAMP)
	$(BIN)/python -m validate.bench --out $(OUT) --height $(HEIGHT) --width $(WIDTH) \
		--doc docs/benchmarks.md

# Every engine of the export (PyTorch, onnxruntime, each TFLite at 1/2/4 threads, XNNPACK on/off):
# table, OUT/runtime.json and OUT/runtime.png.
bench-runtime: $(VENV_STAMP)
	$(BIN)/validate runtime --tflite $(OUT)/nafnet_fp32.tflite

# Each export rewrite pass measured: TFLite with the first k passes, timed interleaved.
bench-passes: $(VENV_STAMP)
	$(BIN)/python -m validate.passes_bench --export $(OUT) --out build/passes

# onnx2tf pins TensorFlow 2.19, so it gets its own environment; its TFLite runs on ours.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --disable-pip-version-check onnx2tf==1.29.24 \
		'tensorflow==2.19.*' 'tf-keras~=2.19.0' 'onnx>=1.17,<1.20' 'onnxruntime>=1.20' \
		onnx_graphsurgeon sng4onnx psutil ai-edge-litert h5py protobuf 'numpy<2.2'
	touch $@

bench-peers: $(VENV_STAMP) $(PEERS_STAMP)
	@test -f $(OUT)/nafnet_fp32.tflite || $(MAKE) export
	$(BIN)/python -m validate.peers --export $(OUT) --peers build/peers --venv $(PEERS_VENV) \
		--doc docs/benchmarks-runtime.md

lint: $(VENV_STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf build .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
