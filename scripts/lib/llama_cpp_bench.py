"""llama.cpp's side of scripts/bench-vs-llama-cpp, through llama-cpp-python's low-level API.

    python llama_cpp_bench.py quantize SRC DST FTYPE THREADS
    python llama_cpp_bench.py speed MODEL THREADS PROMPT DECODE CONVERSATIONS REPEATS

`speed` prints JSON: prefill tokens/s over PROMPT tokens, decode tokens/s after PROMPT and after
3,000 tokens of context, and aggregate decode tokens/s with several sequences in one batch, each
the median of REPEATS runs, after a warm-up (llama.cpp also repacks weights on first use).
"""
import json
import statistics
import sys
import time

import llama_cpp as L
import numpy as np


def quantize(src, dst, ftype, threads):
    p = L.llama_model_quantize_default_params()
    p.ftype = int(ftype)
    p.nthread = int(threads)
    t = time.time()
    rc = L.llama_model_quantize(src.encode(), dst.encode(), p)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")
    print(json.dumps({"seconds": time.time() - t}))


def rss_bytes():
    """This process's resident memory (the interpreter's own few tens of MB included)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Engine:
    def __init__(self, path, threads):
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise SystemExit(f"llama.cpp cannot load {path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.threads = threads
        self.load_rss = rss_bytes()
        self.reply_rss = 0

    def context(self, n_ctx, n_seq):
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = 512
        cp.n_ubatch = 512
        cp.n_seq_max = n_seq
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise SystemExit("llama.cpp cannot make a context")
        return ctx

    def decode(self, ctx, rows):
        """rows: (token, pos, seq, wants_logits), at most 512 at a time."""
        for off in range(0, len(rows), 512):
            chunk = rows[off:off + 512]
            b = L.llama_batch_init(len(chunk), 0, 1)
            b.n_tokens = len(chunk)
            for i, (tok, pos, seq, logits) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = logits
            rc = L.llama_decode(ctx, b)
            L.llama_batch_free(b)
            if rc != 0:
                raise SystemExit(f"llama_decode failed: {rc}")

    def argmax(self, ctx, i):
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def prompt(self, n, seq=0):
        rng = np.random.default_rng(20261201 + seq)
        return [1] + [int(x) for x in rng.integers(300, 30000, size=n - 1)]

    def single(self, prompt_len, decode):
        """(prefill tok/s, decode tok/s) on a fresh context."""
        ctx = self.context(4096, 1)
        # Warm-up: the first use repacks weights.
        self.decode(ctx, [(t, i, 0, i == 15) for i, t in enumerate(self.prompt(16))])
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        ids = self.prompt(prompt_len)
        t = time.perf_counter()
        self.decode(ctx, [(tok, i, 0, i == len(ids) - 1) for i, tok in enumerate(ids)])
        prefill = len(ids) / (time.perf_counter() - t)
        nxt = self.argmax(ctx, -1)
        pos = len(ids)
        t = time.perf_counter()
        for _ in range(decode):
            self.decode(ctx, [(nxt, pos, 0, True)])
            pos += 1
            nxt = self.argmax(ctx, -1)
        dec = decode / (time.perf_counter() - t)
        # Resident memory with the conversation's context still held, as ours is measured.
        self.reply_rss = max(self.reply_rss, rss_bytes())
        L.llama_free(ctx)
        return prefill, dec

    def batched(self, n, decode, prompt_len=64):
        """Aggregate decode tok/s of n sequences decoded in one batch per step."""
        ctx = self.context(n * (prompt_len + decode + 16), n)
        self.decode(ctx, [(t, i, 0, i == 15) for i, t in enumerate(self.prompt(16))])
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        nxt = []
        for s in range(n):
            ids = self.prompt(prompt_len, s)
            self.decode(ctx, [(tok, i, s, i == len(ids) - 1) for i, tok in enumerate(ids)])
            nxt.append(self.argmax(ctx, -1))
        pos = prompt_len
        t = time.perf_counter()
        for _ in range(decode):
            self.decode(ctx, [(nxt[s], pos, s, True) for s in range(n)])
            nxt = [self.argmax(ctx, s) for s in range(n)]
            pos += 1
        agg = n * decode / (time.perf_counter() - t)
        L.llama_free(ctx)
        return agg


def speed(path, threads, prompt_len, decode, conversations, repeats):
    e = Engine(path, int(threads))
    prompt_len, decode, repeats = int(prompt_len), int(decode), int(repeats)
    med = statistics.median
    runs = [e.single(prompt_len, decode) for _ in range(repeats)]
    long = [e.single(3000, decode)[1] for _ in range(repeats)]
    agg = {}
    for n in [int(c) for c in conversations.split(",") if c]:
        agg[str(n)] = med([e.batched(n, decode) for _ in range(repeats)])
    print(json.dumps({
        "prefill_tokens_per_s": med([r[0] for r in runs]),
        "decode_tokens_per_s": med([r[1] for r in runs]),
        "decode_after_3000_tokens_per_s": med(long),
        "aggregate_decode_tokens_per_s": agg,
        "load_rss_bytes": e.load_rss,
        "reply_rss_bytes": e.reply_rss,
    }))


if __name__ == "__main__":
    op, *args = sys.argv[1:]
    {"quantize": quantize, "speed": speed}[op](*args)
