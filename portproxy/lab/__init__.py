"""The lab: namespaces and the demo topology that ``portproxy demo`` and ``portproxy bench``
build, and the demo itself. Nothing here is used by mapping a port."""
