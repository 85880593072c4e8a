"""
Serve a trained model over HTTP with OpenAI's completions API, and a page to try it at
http://127.0.0.1:8000/
    $ python serve.py --out_dir=out-shakespeare-char
    $ curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "ROMEO:"}'
Requests that arrive while others are generating join the running batch at the next step
(docs/serve.md).
"""

import asyncio
import collections
import json
import os
import sys
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from nanogpt import checkpoints
from nanogpt import runtime
from nanogpt.batching import Engine, Row
from configurator import ANY, NON_NEGATIVE, POSITIVE, OneOf, Range, UserError, check, configure

# -----------------------------------------------------------------------------
# 'resume' (from out_dir/ckpt.pt), a gpt2 variant (e.g. 'gpt2-xl') or a local Hugging Face dir
init_from = 'resume'
out_dir = 'out'  # ignored if init_from is not 'resume'
# True: a Hugging Face directory may load pytorch_model.bin, a pickle that can run code
allow_unsafe_pickle = False
# the id clients send as "model" and /v1/models lists ('': out_dir's folder name, or init_from)
model_name = ''
host = '127.0.0.1'  # '0.0.0.0' to accept requests from other machines (there is no authentication)
port = 8000
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
# 'auto' (bfloat16 or float16 on GPUs, float32 elsewhere), 'float32', 'bfloat16', 'float16'
dtype = 'auto'
compile = False  # compile the model's forward (prompts and decoding steps) with torch.compile
max_batch = 16  # most completions decoded together in one forward pass; more wait for a free place
# most completions waiting for a place; a request beyond that gets 429 (retry later)
max_waiting = 256
max_tokens_limit = 2048  # the largest max_tokens a request may ask for
max_choices = 16  # the most completions in one request (number of prompts times n)
log_requests = True  # print one line per request to stdout (uvicorn's access log)
# -----------------------------------------------------------------------------

OPENAI_FIELDS = {
    'model',
    'prompt',
    'max_tokens',
    'temperature',
    'top_p',
    'top_k',
    'n',
    'stop',
    'seed',
    'stream',
    'stream_options',
    'echo',
    'user',
    'logprobs',
    'best_of',
    'suffix',
    'frequency_penalty',
    'presence_penalty',
    'logit_bias',
}


class BadRequest(Exception):
    """An invalid request: answered with OpenAI's error shape, {"error": {"message", "type",
    "param", "code"}}."""

    def __init__(self, message, param=None, status=400, code=None, kind='invalid_request_error'):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = (
            message,
            param,
            status,
            code,
            kind,
        )

    def body(self):
        return {
            'error': {
                'message': self.message,
                'type': self.kind,
                'param': self.param,
                'code': self.code,
            }
        }


def check_settings(c):
    """Each setting's allowed values (configurator.check: bools need none), before anything is
    touched."""
    check(
        c,
        dict(
            init_from=ANY,
            out_dir=ANY,
            model_name=ANY,
            host=ANY,
            port=Range(1, 65535),
            device=ANY,
            dtype=OneOf('auto', *runtime.DTYPES),
            max_batch=POSITIVE,
            max_waiting=NON_NEGATIVE,
            max_tokens_limit=POSITIVE,
            max_choices=POSITIVE,
        ),
    )


def number(body, key, default, low, high, integer=False, low_open=False):
    """body[key] checked to be a number (an int if integer) in [low, high] ((low, high] if
    low_open)."""
    value = body.get(key)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise BadRequest(
            f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}",
            key,
        )
    if value < low or value > high or (low_open and value == low):
        where = f"{'greater than' if low_open else 'at least'} {low} and at most {high}"
        raise BadRequest(f"'{key}' must be {where}, got {value}", key)
    return value


def parse_prompts(prompt, encode, block_size, vocab_size):
    """The prompts of a request as lists of token ids: a string, a list of strings, a list of token
    ids or
    a list of such lists, as OpenAI accepts them."""
    if isinstance(prompt, str) or (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
            "of token ids",
            'prompt',
        )
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            try:
                ids = encode(p)
            except UserError as e:
                raise BadRequest(
                    f"the prompt has {e}: this model knows only the characters of the text it was "
                    f"trained on; remove or replace them",
                    'prompt',
                ) from None
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if any(not 0 <= t < vocab_size for t in p):
                raise BadRequest(
                    f"a token id of the prompt is outside this model's vocabulary (0 to "
                    f"{vocab_size - 1})",
                    'prompt',
                )
            ids = p
        else:
            raise BadRequest(
                "each prompt in a list must be a string or a list of token ids", 'prompt'
            )
        if not ids:
            raise BadRequest(
                "a prompt is empty: give at least one character (or token) to continue", 'prompt'
            )
        if len(ids) > block_size:
            raise BadRequest(
                f"a prompt is {len(ids)} tokens long but this model reads at most {block_size} "
                f"(its block_size): shorten it, e.g. to its last {block_size} tokens",
                'prompt',
            )
        prompts.append(ids)
    return prompts


def parse_request(body, served, encode, block_size, vocab_size):
    """A completions request checked field by field: (prompts as token ids, settings shared by its
    rows)."""
    if not isinstance(body, dict):
        raise BadRequest(
            "the request body must be a JSON object, "
            "e.g. {\"prompt\": \"Hello\", \"max_tokens\": 16}"
        )
    unknown = sorted(set(body) - OPENAI_FIELDS)
    if unknown:
        raise BadRequest(
            f"unknown field(s) {', '.join(unknown)}; "
            f"this server accepts {', '.join(sorted(OPENAI_FIELDS))}",
            unknown[0],
        )
    model = body.get('model')
    if model is not None and model != served:
        raise BadRequest(
            f"the model '{model}' is not served here: "
            f"this server serves '{served}' (GET /v1/models)",
            'model',
            status=404,
            code='model_not_found',
        )
    for key, off in (
        ('logprobs', (None, 0)),
        ('suffix', (None, '')),
        ('frequency_penalty', (None, 0)),
        ('presence_penalty', (None, 0)),
        ('logit_bias', (None, {})),
    ):
        if body.get(key) not in off:
            raise BadRequest(f"'{key}' is not supported by this server: leave it out", key)
    if 'prompt' not in body:
        raise BadRequest("'prompt' is required: the text to continue", 'prompt')
    prompts = parse_prompts(body['prompt'], encode, block_size, vocab_size)
    n = number(body, 'n', 1, 1, max_choices, integer=True)
    if body.get('best_of') not in (None, n):
        raise BadRequest(
            "'best_of' is not supported by this server: leave it out (or make it equal to n)",
            'best_of',
        )
    if len(prompts) * n > max_choices:
        raise BadRequest(
            f"{len(prompts)} prompt(s) times n={n} is more than the {max_choices} completions one "
            f"request may ask for: send several requests",
            'n',
        )
    stop = body.get('stop')
    stop = [stop] if isinstance(stop, str) else stop or []
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise BadRequest(
            "'stop' must be a non-empty string or a list of up to 4 non-empty strings", 'stop'
        )
    flags = {}
    for key in ('stream', 'echo'):
        flags[key] = body.get(key) or False
        if not isinstance(flags[key], bool):
            raise BadRequest(f"'{key}' must be true or false, got {json.dumps(body[key])}", key)
    options = body.get('stream_options') or {}
    if (
        not isinstance(options, dict)
        or set(options) - {'include_usage'}
        or not isinstance(options.get('include_usage', False), bool)
    ):
        raise BadRequest(
            "'stream_options' may only be {\"include_usage\": true or false}", 'stream_options'
        )
    seed = body.get('seed')
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63
    ):
        raise BadRequest(
            f"'seed' must be an integer from 0 to 2**63 - 1, got {json.dumps(seed)}", 'seed'
        )
    settings = dict(
        max_tokens=number(body, 'max_tokens', 16, 1, max_tokens_limit, integer=True),
        temperature=number(body, 'temperature', 1.0, 0, 2),
        top_p=number(body, 'top_p', 1.0, 0, 1, low_open=True),
        top_k=number(body, 'top_k', 0, 0, vocab_size, integer=True),
        stop=stop,
    )
    return (
        prompts,
        n,
        seed,
        flags['stream'],
        flags['echo'],
        options.get('include_usage', False),
        settings,
    )


def build_app(engine, served, encode, decode, block_size, vocab_size):
    """The FastAPI application: the completions and models endpoints, /health and the page at /."""
    app = FastAPI(title='nanoGPT completions', docs_url=None, redoc_url=None, openapi_url=None)
    with open(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nanogpt', 'serve.html'),
        encoding='utf-8',
    ) as f:
        page = f.read()
    created = int(time.time())

    @app.exception_handler(BadRequest)
    async def bad_request(request, e):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown paths and methods, in OpenAI's error shape too
        hint = (
            " (this server has POST /v1/completions, GET /v1/models, GET /health and the page at /)"
        )
        return JSONResponse(
            BadRequest(
                f"{e.detail}: {request.method} {request.url.path}{hint}", status=e.status_code
            ).body(),
            status_code=e.status_code,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        return JSONResponse(BadRequest(f"invalid request: {e.errors()}").body(), status_code=400)

    @app.get('/', response_class=HTMLResponse)
    async def index():
        return page

    @app.get('/health')
    async def health():
        return dict(status='ok', model=served, pid=os.getpid(), **engine.stats())

    @app.get('/v1/models')
    async def models():
        return {
            'object': 'list',
            'data': [
                {
                    'id': served,
                    'object': 'model',
                    'created': created,
                    'owned_by': 'nanoGPT',
                    'max_model_len': block_size,
                }
            ],
        }

    @app.post('/v1/completions')
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(
                f"the request body is not valid JSON ({e}); send a JSON object such as "
                f"{{\"prompt\": \"Hello\", \"max_tokens\": 16}}"
            ) from None
        prompts, n, seed, stream, echo, include_usage, settings = parse_request(
            body, served, encode, block_size, vocab_size
        )
        # the engine's thread appends to `events` and wakes this request's coroutine only when it
        # has to (a stream's new text, a finished completion) and is not already woken: every
        # wake-up is a switch of threads
        loop, ready, events, waking = (
            asyncio.get_running_loop(),
            asyncio.Event(),
            collections.deque(),
            [False],
        )

        def wake():
            waking[0] = False
            ready.set()

        def emit(index, text, finish, error=None):  # called on the engine's thread
            events.append((index, text, finish, error))
            if (stream or finish is not None) and not waking[0]:
                waking[0] = True
                loop.call_soon_threadsafe(wake)

        base = seed if seed is not None else int.from_bytes(os.urandom(7), 'little')
        # choice i: prompt i // n, its own random generator seeded base + i (reproducible whatever
        # else runs)
        rows = [
            Row(i, prompts[i // n], base + i, emit, **settings) for i in range(len(prompts) * n)
        ]
        if not engine.submit(rows):
            raise BadRequest(
                f"the server is busy ({max_waiting} completions waiting): retry in a moment",
                status=429,
                kind='rate_limit_error',
            )
        head = dict(
            id=f"cmpl-{uuid.uuid4().hex}",
            object='text_completion',
            created=int(time.time()),
            model=served,
        )
        prompt_texts = [decode(p) if echo else '' for p in prompts]
        prompt_tokens = sum(len(p) for p in prompts)

        async def results():
            """(choice index, new text, finish_reason or None) as the engine produces them."""
            for i, row in enumerate(rows):
                if echo:
                    yield i, prompt_texts[i // n], None
            left = len(rows)
            while left:
                await ready.wait()
                ready.clear()
                while events:
                    index, text, finish, error = events.popleft()
                    if error:
                        raise BadRequest(error, status=500, kind='server_error')
                    left -= finish is not None
                    yield index, text, finish

        def usage():
            completion = sum(len(row.new) for row in rows)
            return dict(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                total_tokens=prompt_tokens + completion,
            )

        if not stream:
            texts, finishes = [''] * len(rows), [None] * len(rows)
            try:
                async for index, text, finish in results():
                    texts[index] += text
                    finishes[index] = finish or finishes[index]
            finally:
                engine.cancel(rows)  # the client went away, or the engine failed: free their places
            choices = [
                dict(index=i, text=t, logprobs=None, finish_reason=f)
                for i, (t, f) in enumerate(zip(texts, finishes))
            ]
            return dict(head, choices=choices, usage=usage())

        async def sse():
            try:
                async for index, text, finish in results():
                    choice = dict(index=index, text=text, logprobs=None, finish_reason=finish)
                    yield f"data: {json.dumps(dict(head, choices=[choice]))}\n\n"
                if include_usage:
                    yield f"data: {json.dumps(dict(head, choices=[], usage=usage()))}\n\n"
            except BadRequest as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                engine.cancel(rows)
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            sse(), media_type='text/event-stream', headers={'Cache-Control': 'no-cache'}
        )

    return app


def main(config):
    check_settings(config)
    dev, run_dtype, _ = runtime.setup(device, dtype)
    model, encode, decode, source = checkpoints.load_model_and_tokenizer(
        init_from, out_dir, allow_unsafe_pickle
    )
    # GPT-2's vocabulary ends documents with <|endoftext|>: a completion stops there, as OpenAI's do
    record = source['record']
    gpt2 = model.config.vocab_size >= 50257 and (not record or record['tokenizer'] == 'gpt2')
    eot = 50256 if gpt2 else (record or {}).get('eot_token')  # a BPE's own (its last id)
    # its weights in dtype, as sample.py's: no autocast, logits upcast to float32 for sampling
    model = runtime.inference_model(model, dev, run_dtype, compile, cast=True)
    served = model_name or (
        os.path.basename(os.path.abspath(out_dir)) if init_from == 'resume' else init_from
    )
    engine = Engine(model, decode, eot, dev, max_batch, max_waiting)
    engine.start()
    # not the padding of a vocabulary of 50304
    tokens = model.config.vocab_size if eot is None else eot + 1
    app = build_app(engine, served, encode, decode, model.config.block_size, tokens)
    print(
        f"serving {served} on http://{host}:{port} ({dev}, batches of up to {max_batch})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level='info', access_log=log_requests)


if __name__ == '__main__':
    main(configure(globals()))
