"""The port map from the ElastiCache API: ``cacheport import-aws``.

::

    boto3 --Describe*--> Account (the API's dicts)                     (fetch.py, the only I/O)
          --select()/translate()--> ImportedCluster... + Untranslated... (translate.py, pure)
          --render_yaml()--> annotated YAML port map                     (render.py, pure)

Like ``import-iptables``, what cannot be translated comes back as an ``Untranslated``
with its reason, listed in the map and on standard error. boto3 is imported only in
``fetch.py`` and only when the command runs: it is the optional extra ``cacheport[aws]``.
"""

from .command import register, run_import
from .fetch import AwsError, read_account
from .model import ImportedCluster, ImportedListener, Source, Translation, Untranslated
from .render import render_yaml
from .translate import TranslateError, select, translate

__all__ = [
    "AwsError", "ImportedCluster", "ImportedListener", "Source", "TranslateError",
    "Translation", "Untranslated", "read_account", "register", "render_yaml", "run_import",
    "select", "translate",
]
