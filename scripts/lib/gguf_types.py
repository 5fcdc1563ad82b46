"""The type of every tensor in a GGUF file, read from its header: `python gguf_types.py FILE`
prints a JSON map of tensor name to GGML type name."""
import json
import struct
import sys

TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
         10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 30: "BF16"}


def main(path):
    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))

        def string():
            (n,) = read("Q")
            return f.read(n).decode("utf-8", "replace")

        sizes = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

        def value(t):
            if t == 8:
                return string()
            if t == 9:
                (et, n) = read("IQ")
                return [value(et) for _ in range(n)]
            return read(sizes[t])[0]

        magic, _version, n_tensors, n_kv = read("4sIQQ")
        if magic != b"GGUF":
            raise SystemExit(f"{path} is not GGUF")
        for _ in range(n_kv):
            string()
            (t,) = read("I")
            value(t)
        out = {}
        for _ in range(n_tensors):
            name = string()
            (nd,) = read("I")
            read("Q" * nd)
            (t, _offset) = read("IQ")
            out[name] = TYPES.get(t, str(t))
        json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
