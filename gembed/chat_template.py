"""A Hugging Face chat template: the Jinja text an instruction-tuned model's folder carries in
`chat_template.jinja` or in `tokenizer_config.json` ("chat_template"), rendered the way
`transformers`' `apply_chat_template` renders it (sandboxed Jinja, trimmed blocks, `raise_exception`,
`strftime_now` and a `tojson` filter) for one user message and the assistant's turn to answer.
"""
from __future__ import annotations

import datetime
import json
import pathlib

import jinja2
import jinja2.sandbox

from gembed.data.hf_tokenizer import TOKENIZER_SETTINGS
from gembed.errors import GembedUserError

TEMPLATE_FILE = "chat_template.jinja"


def read_chat_template(directory: pathlib.Path) -> str | None:
    """The folder's default chat template, or None when it has none (a base model)."""
    if (directory / TEMPLATE_FILE).is_file():
        return (directory / TEMPLATE_FILE).read_text()
    path = directory / TOKENIZER_SETTINGS
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GembedUserError(
            f"{path}: not valid JSON ({e}); restore it from the source model.") from None
    if isinstance(template, list):   # named templates: [{"name": "default", "template": ...}, ...]
        template = {entry.get("name"): entry.get("template") for entry in template}.get("default")
    return template


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def compile_chat_template(source: str, where: pathlib.Path) -> jinja2.Template:
    """The template, compiled in a sandbox; a syntax error names `where`."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise GembedUserError(f"{where}: the chat template does not compile ({e}); fix it or pass "
                              f"--no_chat_template.") from None


def render_user_turn(template: jinja2.Template, text: str, special_tokens: dict[str, str]) -> str:
    """The prompt for one user message `text`, ending where the assistant's answer begins."""
    return template.render(messages=[{"role": "user", "content": text}],
                           add_generation_prompt=True, **special_tokens)
