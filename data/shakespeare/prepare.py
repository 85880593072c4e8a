"""
Prepare tiny Shakespeare with the GPT-2 BPE tokenizer, as nanoGPT does: the first 90% of the
characters is train.bin and the last 10% val.bin, each encoded with tiktoken's encode_ordinary
(uint16 ids). Works offline: see gpt2_encoding() in tokenizer.py.

    python data/shakespeare/prepare.py                             # downloads input.txt if missing
    python data/shakespeare/prepare.py --input=/path/to/input.txt  # no network needed
"""

import os
import sys

# repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# data/, for prepare_text
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ANY, check, configure
from prepare_text import check_out_dir, download_if_missing, prepare, read_text

# -----------------------------------------------------------------------------
out_dir = os.path.dirname(os.path.abspath(__file__))  # where train.bin and val.bin go
input = ''  # the text; default: input.txt in out_dir, downloaded from url only when it is missing
url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
# -----------------------------------------------------------------------------
check(configure(globals()), dict(out_dir=ANY, input=ANY, url=ANY))  # every setting's allowed values

check_out_dir(out_dir)
if not input:
    input = os.path.join(out_dir, 'input.txt')
    download_if_missing(url, input)
prepare(read_text(input), out_dir, tokenizer='gpt2')

# length of dataset in characters: 1,115,394
# train has 301,966 tokens
# val has 36,059 tokens
