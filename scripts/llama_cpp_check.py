"""Check an exported control vector in llama.cpp against emovec's own runtime, on the default model.

Run by hand (llama-cpp-python builds from source in ~12 minutes on 2 cores, too long for CI), with emovec's
environment, naming a Python that has llama-cpp-python, numpy and gguf:

    python -m venv /tmp/llama && /tmp/llama/bin/pip install llama-cpp-python gguf
    python scripts/llama_cpp_check.py --llama-python /tmp/llama/bin/python

It exports a recipe with ``emovec export gguf``'s code, reads the file back with the ``gguf`` package in the llama
process the way llama.cpp's ``common_control_vector_load`` does (``direction.<i>`` into a buffer starting at layer 1;
the Python binding does not expose that loader) and hands the buffer to ``llama_set_adapter_cvec`` for the whole
layer range. For each prompt it compares the change of the next-token logits (steered minus plain) in llama.cpp
(the Q4_1 GGUF) with the change under ``emovec.steer`` (the dequantised model): the Pearson correlation over the
vocabulary, and whether the top promoted tokens agree. Writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = [
    "The weather today is",
    "I opened the letter and",
    "My manager called me into her office and said",
    "After the long trip, we finally",
    "The results of the test came back, and",
]

LLAMA_SIDE = r'''
import json, sys
import numpy as np, gguf, llama_cpp
model_path, cv_path, prompts_path, out_path = sys.argv[1:5]
prompts = json.load(open(prompts_path))
llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
reader = gguf.GGUFReader(cv_path)
buf = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)  # layers 1 .. n_layer-1, as common_control_vector_load
for t in reader.tensors:
    if t.name.startswith("direction."):
        layer = int(t.name.split(".")[1])
        buf[(layer - 1) * n_embd: layer * n_embd] += np.asarray(t.data, dtype=np.float32)

def next_logits(text):
    llm.reset()
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.eval(tokens)
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64), tokens

out = {"n_embd": n_embd, "n_layer": n_layer, "plain": [], "steered": [], "tokens": []}
for text in prompts:
    logits, tokens = next_logits(text)
    out["plain"].append(logits.tolist()); out["tokens"].append(tokens)
ptr = buf.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, buf.size, n_embd, 1, n_layer - 1)
assert rc == 0, rc
for text in prompts:
    out["steered"].append(next_logits(text)[0].tolist())
json.dump(out, open(out_path, "w"))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python, numpy and gguf")
    parser.add_argument("--recipe", default="desperate=0.15,calm=-0.1")
    parser.add_argument("--layers", default="8-20")
    parser.add_argument("--out", default="benchmarks/results/llama_cpp_check.json")
    args = parser.parse_args()

    import numpy as np
    import torch

    import emovec
    from emovec.cli import _parse_recipe
    from emovec.extraction import default_vectors
    from emovec.integrations.control_vectors import export_control_vector
    from emovec.layers import resolve_layer_indices
    from emovec.models import default_gguf_path

    loaded = emovec.load_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    vectors = default_vectors(model)
    recipe = _parse_recipe([args.recipe])
    layers = resolve_layer_indices(args.layers, len(vectors.layers))
    with tempfile.TemporaryDirectory() as tmp:
        cv = export_control_vector(vectors, recipe, layers, Path(tmp) / "cv.gguf")
        prompts = Path(tmp) / "prompts.json"
        prompts.write_text(json.dumps(PROMPTS))
        side = Path(tmp) / "llama_side.py"
        side.write_text(LLAMA_SIDE)
        result = Path(tmp) / "llama.json"
        subprocess.run([args.llama_python, str(side), str(default_gguf_path()), str(cv), str(prompts), str(result)],
                       check=True)
        llama = json.loads(result.read_text())
    rows = []
    for i, text in enumerate(PROMPTS):
        ids = torch.tensor([llama["tokens"][i]])
        assert ids.tolist()[0] == tokenizer(text, add_special_tokens=False)["input_ids"], "tokenizers disagree"
        with torch.no_grad():
            plain = model(input_ids=ids).logits[0, -1].double()
            with emovec.steer(model, vectors, recipe, layers):
                steered = model(input_ids=ids).logits[0, -1].double()
            # control: the same recipe one layer later (the convention an off-by-one exporter would follow)
            shifted_vectors = [layer + 1 for layer in layers if layer + 1 < len(vectors.layers)]
            with emovec.steer(model, vectors, recipe, shifted_vectors):
                shifted = model(input_ids=ids).logits[0, -1].double()
        ours = (steered - plain).numpy()
        theirs = np.array(llama["steered"][i]) - np.array(llama["plain"][i])
        n = min(len(ours), len(theirs))  # the GGUF vocabulary may be padded
        ours, theirs = ours[:n], theirs[:n]
        corr = float(np.corrcoef(ours, theirs)[0, 1])
        corr_shifted = float(np.corrcoef((shifted - plain).numpy()[:n], theirs)[0, 1])
        top_ours, top_theirs = set(np.argsort(-ours)[:20]), set(np.argsort(-theirs)[:20])
        plain_corr = float(np.corrcoef(plain.numpy()[:n], np.array(llama["plain"][i])[:n])[0, 1])
        rows.append({"prompt": text, "logit_change_correlation": round(corr, 4),
                     "correlation_if_emovec_steered_one_layer_later": round(corr_shifted, 4),
                     "top20_promoted_overlap": len(top_ours & top_theirs),
                     "plain_logit_correlation": round(plain_corr, 4),
                     "mean_abs_change_emovec": round(float(np.abs(ours).mean()), 4),
                     "mean_abs_change_llama_cpp": round(float(np.abs(theirs).mean()), 4)})
        print(f"{text!r}: r(Δ emovec, Δ llama.cpp) = {corr:+.3f}, top-20 overlap {len(top_ours & top_theirs)}/20, "
              f"r(plain logits) = {plain_corr:.3f}; one layer later: r = {corr_shifted:+.3f}", flush=True)
    report = {"command": " ".join(sys.argv), "recipe": recipe, "layers": layers,
              "model": "SmolLM2-135M-Instruct (llama.cpp: Q4_1 GGUF; emovec: the same GGUF dequantised)",
              "prompts": rows,
              "median_logit_change_correlation": float(np.median([r["logit_change_correlation"] for r in rows]))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"median r = {report['median_logit_change_correlation']:+.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
