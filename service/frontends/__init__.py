"""The wire front ends: they parse a wire format and render an answer, nothing more.

``api`` is the JSON API (``/predict``, ``/models``, health, the ``/attention`` page),
``oip`` the Open Inference Protocol over REST (``/v2``) and gRPC, ``http`` what the HTTP
routes share (bodies read within limits, error rendering, middleware, uvicorn). Every
inference goes through ``service.dataplane.DataPlane``; no front end touches the batcher
or the decode pool.
"""
