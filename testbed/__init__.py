"""The test bed: what the tests and the benchmarks share.

Private PostgreSQL and RabbitMQ servers (`servers`), network namespaces (`netns`) and TCP
proxies (`proxy`) to fault; the stack as processes from the registry (`stack`, `replicas`);
clients under load (`load`), an audit of the exchanges (`audit`), the checks that nothing
was lost and every effect happened once (`checks`, `effects`), fault cases (`cases`);
generated histories of public events and the reports they must yield (`history`), single
envelopes (`events`), projections run in-process (`projections`), a toy producer
(`producer`), cheap auth settings (`auth`) and free ports (`ports`).
"""
