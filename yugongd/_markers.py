"""The pluggy markers, kept apart so that every module can import them without cycles."""

import pluggy

PROJECT = "yugongd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
