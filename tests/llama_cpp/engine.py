"""llama.cpp's side of the cross-engine tests, through llama-cpp-python.

Reads one JSON request on stdin and prints one JSON answer:
  {"op": "tokenize", "model": PATH, "texts": [...]}        -> {"ids": [[...], ...]}
  {"op": "greedy", "model": PATH, "prompt": [ids], "n": N} -> {"ids": [...], "first_logits": [...]}
"""
import json
import sys

import llama_cpp
import numpy as np


def main():
    req = json.load(sys.stdin)
    if req["op"] == "tokenize":
        m = llama_cpp.Llama(model_path=req["model"], vocab_only=True, verbose=False)
        ids = [m.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in req["texts"]]
        json.dump({"ids": ids}, sys.stdout)
    elif req["op"] == "greedy":
        m = llama_cpp.Llama(
            model_path=req["model"],
            n_ctx=len(req["prompt"]) + req["n"] + 8,
            n_threads=1,
            n_batch=512,
            verbose=False,
        )
        n_vocab = m.n_vocab()
        m.eval(req["prompt"])

        def last_logits():
            ptr = llama_cpp.llama_get_logits_ith(m.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

        first = last_logits()
        logits = first
        out = []
        for _ in range(req["n"]):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if nxt == m.token_eos():
                break
            m.eval([nxt])
            logits = last_logits()
        json.dump({"ids": out, "first_logits": [float(x) for x in first]}, sys.stdout)
    else:
        raise SystemExit(f"unknown op {req['op']}")


if __name__ == "__main__":
    main()
