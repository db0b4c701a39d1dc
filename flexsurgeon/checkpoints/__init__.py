"""Checkpoint folders in timm's layout: ``names`` (the files), ``folders`` (crash-safe folder
writes), ``locks`` (one writer per folder), ``io`` (save, load, the checks every read makes),
``hub`` (``hf-hub:`` checkpoint sources) and ``timm_registry`` (the timm architecture that loads
a folder through ``timm.create_model('local-dir:DIR')``).

May import: ``surgery``, ``layers`` and the base modules.
"""
