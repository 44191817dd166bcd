"""`python -m examples.faststream_subscriber`: run the subscriber until SIGINT or SIGTERM."""

import asyncio
import logging

from examples.faststream_subscriber.app import Settings, build_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
asyncio.run(build_app(Settings.from_env()).run())
