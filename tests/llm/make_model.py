"""Writes a tiny Llama model in GGUF for straycat's tests against a real llama.cpp server.

Nothing is downloaded: the vocabulary and tokenizer metadata are copied from the Llama-2
(SentencePiece) vocab-only GGUF that llama.cpp keeps for its tokenizer tests and that
llama-cpp-python's sdist vendors (vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf); the
weights are random, from a fixed seed, so the text is nonsense but a real tokenizer turns
real tokens into text, sampled and streamed by the real server.

2 layers, 128 dimensions, 4 heads, feed-forward 256; the two vocabulary-sized matrices in
f16, the rest f32: about 18 MB.

So that a turn ends by itself, well inside a small context and never on its first token,
and streams all the way, the weights are not all random:

- dimension 0 of every token's embedding is 1 (a constant the output layer uses as a
  bias), dimension 1 is 1 for the "stop" tokens, dimension 2 is 1 for the pieces of the
  chat template's end (`]` of `[/INST]`, which the first token of an answer follows), the
  other dimensions are random;
- the output row of `</s>` reads only dimensions 0 and 1: its logit is about -20 after an
  ordinary token and about +20 after a stop token, so the answer ends right after the first
  stop token it samples;
- the stop tokens' rows read dimension 2 as -30: no stop token right after `[/INST]`, so an
  answer has at least two tokens;
- the stop tokens are the pieces ending in `.`, `!` or `?` plus a seeded random pick of
  ordinary pieces, together 1/STOP_EVERY of the vocabulary: with STOP_EVERY = 60 an answer
  is about 75 tokens long on average (seen: 4 to 259 in 30 answers; geometric-like), and
  the sampler picks its tokens among the ~30 that the random output rows favour after the
  previous one;
- the three pieces past U+FFFF (`𝕜`, `🌍`, `𝓝`) get a fixed logit among the best 40 after
  any ordinary token, so that most answers have some (the server sends them as \\u
  surrogate pairs);
- every token that is not an ordinary piece (`<unk>`, `<s>`, the 256 byte tokens
  `<0x00>`…`<0xFF>`) gets a logit of about -40: never sampled. Random byte tokens make
  invalid UTF-8, and llama-cpp-python's streaming then stops passing text on (seen: a
  stream silent for minutes, `: ping`s only, while the server kept generating). Ordinary
  pieces are whole UTF-8 strings, thousands of them non-ASCII (the server sends those as
  \\u escapes).

The layers' own weights are small (std 0.02), and they write nothing into dimensions 0-2
(those rows of attn_output and ffn_down are 0): attention would otherwise spread the
template flag of `[/INST]` into the answer and keep the stop tokens down for good.

`--stop-every 0` writes the same model without stop tokens: it never ends a turn by itself,
the server stops it when the context is full (finish_reason "length"), so an answer's
length is set by the server's --n_ctx: run.sh uses it for answers that surely overlap
(--n_ctx 512: ~500 tokens) and for turns longer than 15 s (4096).

Usage: make_model.py --vocab ggml-vocab-llama-spm.gguf --out tiny.gguf [--seed N] [--stop-every N]
"""

import argparse
import sys

import numpy as np

import gguf

N_EMBD = 128
N_LAYER = 2
N_HEAD = 4
N_FF = 256
CONTEXT = 4096
STOP_EVERY = 60
SEED = 1865


def copy_tokenizer(reader, writer):
    """Every tokenizer.* key of the vocab file, with its type."""
    n = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", required=True, help="a Llama (SPM) vocab-only GGUF")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--stop-every", type=int, default=STOP_EVERY,
                    help="mean answer length in tokens; 0: no stop tokens")
    args = ap.parse_args()

    reader = gguf.GGUFReader(args.vocab)
    if "tokenizer.ggml.tokens" not in reader.fields:
        sys.exit(f"make_model.py: {args.vocab} has no tokenizer.ggml.tokens")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    eos = reader.fields["tokenizer.ggml.eos_token_id"].contents()
    bos = reader.fields["tokenizer.ggml.bos_token_id"].contents()
    unk = reader.fields["tokenizer.ggml.unknown_token_id"].contents()
    n_vocab = len(tokens)

    rng = np.random.default_rng(args.seed)

    # The pieces of the chat template's end ("[/INST]"), which the first token follows:
    # never stop tokens themselves.
    template = np.array(["]" in t or "INST" in t for t in tokens])

    # The stop tokens.
    normal = np.array([t == gguf.TokenType.NORMAL for t in types])
    stop = np.zeros(n_vocab, dtype=bool)
    if args.stop_every > 0:
        ends = [normal[i] and not template[i] and t[-1:] in (".", "!", "?") for i, t in enumerate(tokens)]
        stop[np.array(ends)] = True
    want = n_vocab // args.stop_every - int(stop.sum()) if args.stop_every > 0 else 0
    candidates = np.flatnonzero(normal & ~stop & ~template)
    if want > 0:
        stop[rng.choice(candidates, size=want, replace=False)] = True

    # Embeddings: [1, stop flag, template flag, random...].
    sigma_e = 0.1
    embd = rng.normal(0.0, sigma_e, size=(n_vocab, N_EMBD)).astype(np.float32)
    embd[:, 0] = 1.0
    embd[:, 1] = stop.astype(np.float32)
    embd[:, 2] = template.astype(np.float32)

    # After the final RMS norm (weight 1): an ordinary token gives h0 = 1/rms_off, a stop
    # or template token h0 = h1 (or h2) = 1/rms_on.
    rest = (N_EMBD - 3) * sigma_e**2
    h_off = 1.0 / np.sqrt((1.0 + rest) / N_EMBD)
    h_on = 1.0 / np.sqrt((2.0 + rest) / N_EMBD)
    out = rng.normal(0.0, 0.3, size=(n_vocab, N_EMBD)).astype(np.float32)
    out[:, 0:3] = 0.0
    out[stop, 2] = -30.0 / h_on
    out[eos, :] = 0.0
    out[eos, 0] = -20.0 / h_off
    out[eos, 1] = 20.0 / h_on - out[eos, 0]
    never = ~normal
    never[eos] = False
    out[never, :] = 0.0
    out[never, 0] = -40.0 / h_off
    # The few pieces past U+FFFF (the server sends them as \\u surrogate pairs): a fixed
    # logit among the ~40 best after any ordinary token, so most answers have some.
    astral = np.array([normal[i] and any(ord(c) > 0xFFFF for c in t) for i, t in enumerate(tokens)])
    astral &= ~stop
    out[astral, :] = 0.0
    out[astral, 0] = 9.0 / h_off

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name("straycat-tiny-random")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    n_keys = copy_tokenizer(reader, w)

    def small(*shape):
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    def writes_3_up(m):
        # numpy rows are the output dimensions (GGUF's ne1).
        m[0:3, :] = 0.0
        return m

    ones = np.ones(N_EMBD, dtype=np.float32)
    w.add_tensor("token_embd.weight", embd.astype(np.float16))
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", small(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_k.weight", small(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_v.weight", small(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_output.weight", writes_3_up(small(N_EMBD, N_EMBD)))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", small(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", small(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", writes_3_up(small(N_EMBD, N_FF)))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", out.astype(np.float16))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(
        f"{args.out}: llama, {N_LAYER} layers, {N_EMBD} dims, {n_vocab} tokens "
        f"({n_keys} tokenizer keys copied), {int(stop.sum())} stop tokens, seed {args.seed}"
    )


if __name__ == "__main__":
    main()
