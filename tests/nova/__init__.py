"""A real Nova on 127.0.0.1 for the snapshot tests: the pieces ``tests.nova_fixture`` starts.

``launch`` runs nova-manage, conductor, scheduler and compute (with the test hypervisor on
``nova.virt``'s path) and holds the gunicorn entry points of nova-api and Placement;
``neutron_stub`` answers Nova's network calls; ``virt/imagekit_fake.py`` is the test
hypervisor. What is not real is named in ``tests/nova_fixture.py``.
"""
