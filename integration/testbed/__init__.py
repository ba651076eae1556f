"""The CPU testbed: real SGLang servers and real redis-servers for tests, the demo and
benchmarks. Not part of the product: nothing in ``hiradix``, ``backends`` or
``integration/sglang`` imports it (map in ``integration/README.md``)."""
