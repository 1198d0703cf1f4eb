"""Deployment files (Kubernetes, KServe, observability) and their offline checks.

``python -m deploy.validate`` renders and validates the manifests; ``deploy.queries``
reads the metric names out of every PromQL query. Development tools only: nothing here is
part of the service or its image.
"""
