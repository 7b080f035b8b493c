"""The ``quests-torch`` command line: thin front ends that parse, call the API and write results.

Subcommands: ``descriptors``, ``entropy``, ``dh``, ``overlap``, ``learning-curve``,
``bandwidth``, ``screen``, ``compress``, ``generations``, ``generate`` and ``demo``, one module
each (``register(subparsers)`` adds its parser, ``run(args)`` computes through the library and
returns the JSON document and the summary lines). Inputs are any file ASE can read (with ``-i``
an ASE index/slice) or a descriptor file (``.npz``/``.pt`` written by ``descriptors``, which
records ``k`` and the cutoff: comparing descriptors made with different parameters is an
error). Every command prints a readable summary (``--quiet``: none), writes machine-readable
JSON with ``-o`` (parameters, versions, timings, results; atomically) and, where a picture
helps, PNG figures with ``--plot PREFIX``. Errors are one line on stderr and exit code 2, never
a traceback (``QUESTS_TORCH_DEBUG=1`` re-raises for debugging).

Layout:

* :mod:`.app`: the parser (:func:`build_parser`) and the entry point (:func:`main`);
* :mod:`.options`: argparse value types (the library's validators) and shared option groups;
* :mod:`.inputs`: structures or descriptor files, reconciled ``k``/cutoff, the devices;
* :mod:`.rows`: the ``--rows N|auto|all`` cost rule and progress bars;
* :mod:`.outputs`: output paths checked before anything is computed;
* :mod:`.report`: the JSON envelope and shared summary formatting;
* one module per command.
"""

from __future__ import annotations

from ..io import atomic_write
from .app import COMMANDS, build_parser, main
from .inputs import read_structures
from .options import CLIError

__all__ = ["COMMANDS", "CLIError", "atomic_write", "build_parser", "main", "read_structures"]
