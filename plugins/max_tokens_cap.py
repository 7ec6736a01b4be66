"""Example drop-in plugin: refuse requests that ask for more completion tokens than a cap.

Load it with ``plugins: {dirs: ["plugins"]}``; set the cap with the environment variable
``YUGONGD_MAX_TOKENS_CAP`` (unset: the plugin does nothing). It shows the two things
most plugins need: a hook implementation marked with ``yugongd.hookimpl``, and a
``yugongd.Denial`` that the gateway turns into an OpenAI-style error for the client.
"""

import os

from yugongd import Call, Denial, hookimpl


@hookimpl
def yugongd_authorize(call: Call) -> Denial | None:
    cap = os.environ.get("YUGONGD_MAX_TOKENS_CAP")
    if not cap or not isinstance(call.body, dict):
        return None
    asked = call.body.get("max_completion_tokens", call.body.get("max_tokens"))
    if isinstance(asked, int) and asked > int(cap):
        return Denial(
            400,
            "max_tokens_too_large",
            f"This gateway allows at most {cap} completion tokens per request.",
        )
    return None
