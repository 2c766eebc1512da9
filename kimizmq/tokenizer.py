"""The model directory's own tokenizer, without running the model's Python.

Kimi checkpoints ship ``tiktoken.model`` (base64 token, rank per line),
``tokenizer_config.json`` (special tokens after the base vocabulary and a Jinja
``chat_template``) and a ``tokenization_kimi.py`` meant for transformers'
remote code. We rebuild that tokenizer from the data files with ``tiktoken``
and never import anything from the model directory. Models that ship a
``tokenizer.json`` go through transformers' ``AutoTokenizer`` with
``trust_remote_code=False``.
"""

import codecs
import hashlib
import json
import re
from abc import ABC, abstractmethod
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import tiktoken
from jinja2.sandbox import SandboxedEnvironment
from tiktoken.load import load_tiktoken_bpe

# From Moonshot's tokenization_kimi.py (TikTokenTokenizer).
KIMI_PAT_STR = (
    r"[\p{Han}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
CHAT_END_TOKEN = "<|im_end|>"


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable."""


class RenderError(ValueError):
    """Messages the chat template cannot render safely; the client's to fix."""


# Around every request string in a rendered chat: encoded as plain text, never
# as special tokens. Noncharacters, which no client has reason to send.
PLAIN_OPEN, PLAIN_CLOSE = "\ufdd0", "\ufdd1"
UNFENCED_KEYS = frozenset({"role", "type"})
UNFENCED_VALUE = re.compile(r"[a-z_]{1,32}")  # no special token is spelled so


def _fence(value: Any, key: str | None = None) -> Any:
    """`value` with every string between the markers, but `role` and `type`
    values that are plain lowercase words (templates compare them)."""
    if isinstance(value, str):
        if PLAIN_OPEN in value or PLAIN_CLOSE in value:
            raise RenderError("request strings must not contain the noncharacters U+FDD0 or U+FDD1")
        if not value or (key in UNFENCED_KEYS and UNFENCED_VALUE.fullmatch(value)):
            return value
        return f"{PLAIN_OPEN}{value}{PLAIN_CLOSE}"
    if isinstance(value, dict):
        return {k: _fence(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_fence(v) for v in value]
    return value


class StreamingDetokenizer(Protocol):
    """Turns token ids into text one token at a time.

    ``add_token`` returns only text that can no longer change; a character
    whose bytes span several tokens comes out whole once its last byte
    arrives. ``finalize`` returns whatever was held back. The concatenation of
    all returned pieces equals ``Tokenizer.decode`` of all the ids.
    """

    def add_token(self, token_id: int) -> str: ...

    def finalize(self) -> str: ...


class ByteStreamingDetokenizer:
    """Feeds each token's bytes into an incremental UTF-8 decoder."""

    def __init__(self, encoding: tiktoken.Encoding):
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_token(self, token_id: int) -> str:
        return self._decoder.decode(self._encoding.decode_single_token_bytes(token_id))

    def finalize(self) -> str:
        return self._decoder.decode(b"", final=True)


class NaiveDetokenizer:
    """mlx-lm's NaiveStreamingDetokenizer behind our two-method interface."""

    def __init__(self, hf_tokenizer: Any):
        from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

        self._inner = NaiveStreamingDetokenizer(hf_tokenizer)

    def add_token(self, token_id: int) -> str:
        self._inner.add_token(token_id)
        return self._inner.last_segment

    def finalize(self) -> str:
        self._inner.finalize()
        return self._inner.last_segment


class Tokenizer(ABC):
    """Encode, decode and chat-format text for one model directory."""

    bos_token_id: int | None
    eos_token_ids: set[int]
    vocab_size: int

    def __init__(
        self, model_dir: Path, config: dict, chat_template: str | None, *, shipped_templates: list[str] | None = None
    ):
        self.model_dir = model_dir
        self._config = config
        self.chat_template_source = chat_template
        # every chat template the checkpoint ships: the one served and named others (a thinking variant)
        self.shipped_chat_templates = shipped_templates if shipped_templates is not None else [chat_template or ""]
        self._chat_template = None
        if chat_template is not None:
            try:
                self._chat_template = compile_chat_template(chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(f"{model_dir}: chat template does not parse: {e}") from e

    @abstractmethod
    def encode(
        self,
        text: str,
        *,
        allow_special: bool = False,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """Token ids for ``text``.

        ``allow_special``: text such as ``<|im_end|>`` becomes its special
        token; otherwise it is encoded as ordinary text. ``add_special_tokens``:
        add what the tokenizer adds around a sequence (e.g. BOS), if anything.
        """

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text for ``ids``, special tokens included."""

    @abstractmethod
    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer."""

    @abstractmethod
    def special_tokens_map(self) -> dict[str, str]:
        """bos_token, eos_token, ... as strings, for chat templates."""

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Render the model's own chat template and encode it.

        Special tokens the template writes are recognised, as transformers does;
        every string that came with the request (contents, names, tool
        definitions, call arguments) is encoded as plain text, so no field can
        close its turn and forge another role's. Each such string is rendered
        between two Unicode noncharacters, and the rendered text is encoded
        piece by piece."""
        if self._chat_template is None:
            raise TokenizerError(
                f"{self.model_dir} has no chat template (looked for "
                "chat_template.jinja and tokenizer_config.json's chat_template)"
            )
        extra = {"tools": _fence(tools)} if tools else {}
        try:
            text = self._chat_template.render(
                messages=_fence(messages),
                add_generation_prompt=add_generation_prompt,
                **extra,
                **template_kwargs,
                **self.special_tokens_map(),
            )
        except jinja2.TemplateError as e:
            raise RenderError(f"the chat template refused the messages: {e}") from e
        pieces = re.split(f"([{PLAIN_OPEN}{PLAIN_CLOSE}])", text)
        ids: list[int] = []
        depth = 0
        for piece in pieces:
            if piece == PLAIN_OPEN:
                depth += 1
            elif piece == PLAIN_CLOSE:
                depth -= 1
                if depth < 0:
                    raise RenderError("the chat template cut a request string apart")
            elif piece:
                ids += self.encode(piece, allow_special=depth == 0)
        if depth != 0:
            raise RenderError("the chat template cut a request string apart")
        return ids

    def _eos_ids(self, token_to_id: dict[str, int], eos_token: str | None) -> set[int]:
        ids = set(as_id_list(self._config.get("eos_token_id")))
        generation_config = self.model_dir / "generation_config.json"
        if generation_config.exists():
            ids |= set(as_id_list(read_json(generation_config).get("eos_token_id")))
        for token in (eos_token, CHAT_END_TOKEN):
            if token is not None and token in token_to_id:
                ids.add(token_to_id[token])
        return ids


class TiktokenTokenizer(Tokenizer):
    """Kimi's tokenizer: tiktoken.model plus tokenizer_config.json."""

    def __init__(self, model_dir: Path, config: dict, tokenizer_config: dict):
        super().__init__(
            model_dir,
            config,
            load_chat_template(model_dir, tokenizer_config),
            shipped_templates=shipped_chat_templates(model_dir, tokenizer_config),
        )
        self._tokenizer_config = tokenizer_config
        ranks = load_ranks(model_dir / "tiktoken.model")
        num_base = len(ranks)
        added = tokenizer_config.get("added_tokens_decoder", {})
        named = {int(i): token_content(t) for i, t in added.items()}
        special = {
            named.get(i, f"<|reserved_token_{i}|>"): i for i in range(num_base, num_base + NUM_RESERVED_SPECIAL_TOKENS)
        }
        self.encoding = tiktoken.Encoding(
            name=str(model_dir / "tiktoken.model"),
            pat_str=KIMI_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=special,
        )
        self.vocab_size = self.encoding.n_vocab
        bos = token_content(tokenizer_config.get("bos_token"))
        self.bos_token_id = special.get(bos, config.get("bos_token_id"))
        self.eos_token_ids = self._eos_ids(special, token_content(tokenizer_config.get("eos_token")))

    def encode(
        self,
        text: str,
        *,
        allow_special: bool = False,
        add_special_tokens: bool = False,
    ) -> list[int]:
        if allow_special:
            ids = self.encoding.encode(text, allowed_special="all")
        else:
            ids = self.encoding.encode(text, allowed_special=set(), disallowed_special=())
        if add_special_tokens and self._tokenizer_config.get("add_bos_token", False):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def detokenizer(self) -> StreamingDetokenizer:
        return ByteStreamingDetokenizer(self.encoding)

    def special_tokens_map(self) -> dict[str, str]:
        keys = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {k: token_content(self._tokenizer_config[k]) for k in keys if self._tokenizer_config.get(k) is not None}


class HFTokenizer(Tokenizer):
    """Any tokenizer.json model, through transformers without remote code."""

    def __init__(self, model_dir: Path, config: dict, tokenizer_config: dict):
        super().__init__(
            model_dir,
            config,
            load_chat_template(model_dir, tokenizer_config),
            shipped_templates=shipped_chat_templates(model_dir, tokenizer_config),
        )
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot load {model_dir / 'tokenizer.json'}: {e}") from e
        self.vocab_size = len(self.hf)
        self.bos_token_id = self.hf.bos_token_id
        self.eos_token_ids = self._eos_ids(self.hf.get_vocab(), self.hf.eos_token)

    def encode(
        self,
        text: str,
        *,
        allow_special: bool = False,
        add_special_tokens: bool = False,
    ) -> list[int]:
        return self.hf.encode(
            text,
            add_special_tokens=add_special_tokens,
            split_special_tokens=not allow_special,
        )

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    def detokenizer(self) -> StreamingDetokenizer:
        return NaiveDetokenizer(self.hf)

    def special_tokens_map(self) -> dict[str, str]:
        return dict(self.hf.special_tokens_map)


def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        x,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template in Jinja's sandbox. Not the immutable one transformers
    uses: Kimi-K2's template appends tool-call ids to a list of its own (only
    template-local data and copies of the request are mutable)."""
    env = SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def load_chat_template(model_dir: Path, tokenizer_config: dict) -> str | None:
    """chat_template.jinja if present, else tokenizer_config.json's chat_template."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def shipped_chat_templates(model_dir: Path, tokenizer_config: dict) -> list[str]:
    """chat_template.jinja and each of tokenizer_config.json's chat templates."""
    jinja_file = model_dir / "chat_template.jinja"
    sources = [jinja_file.read_text()] if jinja_file.exists() else []
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        sources += [t["template"] for t in template]
    elif isinstance(template, str):
        sources.append(template)
    return sources


def load_ranks(path: Path) -> dict[bytes, int]:
    """Mergeable ranks from a tiktoken.model file, checked for consistency."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    try:
        # tiktoken caches files by path; the content hash keeps a stale copy out.
        ranks = load_tiktoken_bpe(str(path), expected_hash=hashlib.sha256(data).hexdigest())
    except ValueError as e:
        raise TokenizerError(f"{path} is not a valid tiktoken BPE file: {e}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError(f"{path}: every single byte must be a token")
    return ranks


def token_content(token: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return list(value)


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    except ValueError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of the model in ``model_dir``.

    Uses ``tiktoken.model`` when present (Kimi), else ``tokenizer.json`` through
    transformers. Raises TokenizerError naming the file that is missing or bad.
    """
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    config = read_json(config_file) if config_file.exists() else {}
    tokenizer_config_file = model_dir / "tokenizer_config.json"
    if (model_dir / "tiktoken.model").exists():
        if not tokenizer_config_file.exists():
            raise TokenizerError(
                f"{tokenizer_config_file} is missing; a tiktoken.model needs it "
                "for its special tokens and chat template"
            )
        return TiktokenTokenizer(model_dir, config, read_json(tokenizer_config_file))
    if (model_dir / "tokenizer.json").exists():
        tokenizer_config = read_json(tokenizer_config_file) if tokenizer_config_file.exists() else {}
        return HFTokenizer(model_dir, config, tokenizer_config)
    raise TokenizerError(
        f"no tokenizer in {model_dir}: expected tiktoken.model (with tokenizer_config.json) or tokenizer.json"
    )
