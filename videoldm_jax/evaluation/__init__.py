"""Video metrics: FVD (I3D), FID (Inception), IS (C3D) and CLIPSIM (CLIP), with float64 feature statistics.

``statistics``  streaming mean / covariance, Fréchet distance, Inception Score splits
``i3d``         Kinetics-400 I3D (the FVD network) and its strict, allow-listed weight loader
``fvd``         the FVD protocol, sharded feature extraction and the video / statistics sources

The feature networks of the other metrics (``inception``, ``c3d``, ``clip_image``) are imported only by the
metrics that use them, so FVD needs none of them.
"""
