"""
Prepare tiny Shakespeare for character-level language modeling, as nanoGPT does: the vocabulary is
the text's sorted set of characters (65), the first 90% is train.bin and the last 10% val.bin
(uint16 ids), and meta.pkl holds vocab_size, itos and stoi for train.py and sample.py.

    python data/shakespeare_char/prepare.py                        # downloads input.txt if missing
    python data/shakespeare_char/prepare.py --input=/path/to/input.txt  # no network needed
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
out_dir = os.path.dirname(os.path.abspath(__file__))  # where train.bin, val.bin and meta.pkl go
input = ''  # the text; default: input.txt in out_dir, downloaded from url only when it is missing
url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
# -----------------------------------------------------------------------------
check(configure(globals()), dict(out_dir=ANY, input=ANY, url=ANY))  # every setting's allowed values

check_out_dir(out_dir)
if not input:
    input = os.path.join(out_dir, 'input.txt')
    download_if_missing(url, input)
prepare(read_text(input), out_dir, tokenizer='char')

# length of dataset in characters: 1,115,394
# vocab size: 65
# train has 1,003,854 tokens
# val has 111,540 tokens
