"""Files srigl writes and reads: training checkpoints, condensed models, ONNX exports.

* :mod:`~srigl.io.atomic`: the one atomic file write every writer here uses.
* :mod:`~srigl.io.checkpoint`: training state (model, sparsifier, optimizer, scheduler, RNG) to resume.
* :mod:`~srigl.io.serialization`: condensed models as safetensors, rebuildable without pickles.
* :mod:`~srigl.io.export`: ONNX export of condensed models.

Nothing is imported here: ``import srigl`` reaches these modules lazily, by name.
"""
