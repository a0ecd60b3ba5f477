"""Federated deployment on Flower: the same methods across processes and machines.

``pip install -e '.[flower]'``. A Flower ``ServerApp``
(:mod:`hetlora.flower.server_app`) runs any hetlora method with the server
steps of the in-process simulation (:func:`hetlora.server.make_steps`:
sampling, distribution at each client's rank, screening, the method's jitted
aggregation, the server state, orbax checkpoints in the workdir); a
``ClientApp`` (:mod:`hetlora.flower.client_app`) trains one client on its
site's own data partition with :func:`hetlora.client.local_train`.
Messages carry each client's ``r_k`` rank slots, ``r_k (d_in + d_out)``
numbers per module (:mod:`hetlora.flower.wire`). ``docs/flower.md`` has the
engines (simulation, deployment), the commands and what each side stores.

Modules: ``wire`` (rank slots <-> Flower records), ``site`` (a client site's
experiment and local training), ``client_app``, ``strategy`` (the server's
round over a Flower grid), ``server_app``.
"""
