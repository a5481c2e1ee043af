#!/usr/bin/env python3
"""Renders a chat template with jinja2 exactly as transformers' apply_chat_template does.

Usage: jinja_peer.py JOB.json, where JOB is {"template": str, "contexts": [object, ...]}.
Prints a JSON list with one entry per context: {"ok": true, "text": rendering} or
{"ok": false, "type": exception class, "error": message}. chat_template_test compares
epic's ChatTemplate with these renderings byte for byte.
"""
import json
import sys

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces jinja2's tojson, which would HTML-escape, with json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    results = []
    try:
        template = env.from_string(job["template"])
    except Exception as e:  # a syntax error fails every context alike
        template, parse_error = None, e
    for context in job["contexts"]:
        try:
            if template is None:
                raise parse_error
            results.append({"ok": True, "text": template.render(**context)})
        except Exception as e:
            results.append({"ok": False, "type": type(e).__name__, "error": str(e)})
    json.dump(results, sys.stdout, ensure_ascii=True)


if __name__ == "__main__":
    main()
