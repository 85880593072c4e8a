"""
Sample from a trained model: `python sample.py --out_dir=out-shakespeare-char`,
or from OpenAI's GPT-2: `python sample.py --init_from=gpt2-xl --start="What is the answer?"`.
"""

import os
import sys
import time

import torch

from nanogpt import checkpoints
from nanogpt import runtime
from configurator import ANY, NON_NEGATIVE, POSITIVE, SEED, OneOf, UserError, check, configure
from nanogpt.tokenizer import describe

# -----------------------------------------------------------------------------
# 'resume' (from out_dir/ckpt.pt), a gpt2 variant (e.g. 'gpt2-xl') or a local Hugging Face dir
init_from = 'resume'
out_dir = 'out'  # ignored if init_from is not 'resume'
# True: a Hugging Face directory may load pytorch_model.bin, a pickle that can run code
allow_unsafe_pickle = False
start = "\n"  # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10  # number of samples to draw
max_new_tokens = 500  # number of tokens generated in each sample
# 1.0 = no change, < 1.0 = less random, > 1.0 = more random, 0 = always the most likely token
temperature = 0.8
# retain only the top_k most likely tokens, clamp others to have 0 probability (0: no limit)
top_k = 200
seed = 1337
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
# 'auto' (bfloat16 or float16 on GPUs, float32 elsewhere), 'float32', 'bfloat16', 'float16'
dtype = 'auto'
compile = False  # use PyTorch 2.0 to compile the model to be faster
stream = False  # print each token as it is generated (samples are then drawn one at a time)
kv_cache = True  # False: recompute the whole context for every token, as nanoGPT does
# -----------------------------------------------------------------------------
config = configure(globals())


def check_settings(c):
    """Each setting's allowed values (configurator.check: bools need none), before anything is
    touched."""
    check(
        c,
        dict(
            init_from=ANY,
            out_dir=ANY,
            start=ANY,
            num_samples=POSITIVE,
            max_new_tokens=POSITIVE,
            temperature=NON_NEGATIVE,
            top_k=NON_NEGATIVE,
            seed=SEED,
            device=ANY,
            dtype=OneOf('auto', *runtime.DTYPES),
        ),
    )


check_settings(config)
device, dtype, _ = runtime.setup(device, dtype, seed)

# model, and the tokenizer its text is read with; record: what made the training data, if recorded
model, encode, decode, source = checkpoints.load_model_and_tokenizer(
    init_from, out_dir, allow_unsafe_pickle
)
meta_path, record = source['meta_path'], source['record']
# its weights in dtype, no autocast: faster to decode, its logits upcast to float32 for sampling
model = runtime.inference_model(model, device, dtype, compile, cast=True)

# encode the beginning of the prompt
if start.startswith('FILE:'):
    try:
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"cannot read the prompt file {start[5:]}: {getattr(e, 'strerror', None) or e}"
        ) from None
start_ids = encode(start)
if not start_ids:
    raise UserError(
        "the prompt is empty: give at least one character with --start=... (the default is a "
        "newline)"
    )
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]  # (1, T)
# what is not a sample goes to stderr, after any error about the prompt
if record:
    print(f"decoding with the checkpoint's tokenizer: {describe(record)}", file=sys.stderr)
elif meta_path and os.path.exists(meta_path):
    print(f"Loading meta from {meta_path}...", file=sys.stderr)
else:
    print("No meta.pkl found, assuming GPT-2 encodings...", file=sys.stderr)


def stream_sample(x):
    """Generate one sample, printing text as it appears. A BPE token can end inside a multi-byte
    character, so text is printed only up to the last complete character."""
    print(start, end='', flush=True)
    tokens, shown = [], 0
    for token in model.generate_tokens(
        x, max_new_tokens, temperature, top_k or None, use_cache=kv_cache
    ):
        tokens.append(token.item())
        text = decode(tokens)
        if not text.endswith('\ufffd'):
            print(text[shown:], end='', flush=True)
            shown = len(text)
    print(decode(tokens)[shown:])


# run generation
t0 = time.perf_counter()
with torch.no_grad():
    if stream:
        for k in range(num_samples):
            stream_sample(x)
            print('---------------')
    else:  # all samples in one batch: the weights are read once per step for all of them
        y = model.generate(
            x.expand(num_samples, -1),
            max_new_tokens,
            temperature,
            top_k or None,
            use_cache=kv_cache,
        )
        for k in range(num_samples):
            print(decode(y[k].tolist()))
            print('---------------')
runtime.synchronize(device)
dt = time.perf_counter() - t0
print(
    f"{num_samples} samples of {max_new_tokens} tokens in {dt:.2f}s "
    f"({num_samples * max_new_tokens / dt:.1f} tokens/s)",
    file=sys.stderr,
    flush=True,
)
