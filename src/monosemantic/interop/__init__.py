"""The field's own tools on our models: TransformerLens, SAELens, SAEDashboard and SAEBench.

These libraries pin versions our main install does not want (SAEDashboard needs numpy < 2 and an older
``datasets``), so they live in a separate environment: ``make interop-env`` builds ``.venv-interop``, and
``make test-interop`` runs ``tests/interop``. Nothing here is imported by the rest of the package, and
nothing downloads from a hub: every model, SAE and text comes from local files.

- :mod:`.tlens`: our transformer as a ``HookedTransformer`` (or ``HookedSAETransformer``), tokenizer attached.
- :mod:`.saelens`: our SAE export through ``sae_lens.SAE``; spliced loss and steering through SAELens.
- :mod:`.dashboard`: SAEDashboard's feature-centric HTML for chosen features.
- :mod:`.saebench`: SAEBench's core evaluation on our held-out text, beside our own metrics.

``python -m monosemantic.interop --help`` lists the commands.
"""
