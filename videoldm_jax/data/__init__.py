"""Input data: synthetic driving scenes, PyAV video decoding, stored-record helpers and grain pipelines.

``synthetic``  procedural driving scenes (the offline default dataset)
``video``      PyAV decoding at a target fps by container timestamps, resize / crop
``isolated``   worker processes for decoding untrusted files: a crashing decoder costs one file, not the run
``records``    frame selection, JPEG frames of prepared datasets, latent-moment records
``pipeline``   grain pipelines -> (global) batches, checkpointable iterator state
"""
