"""The change feed in Dagster: the `change_feed` asset (one drain pass: segments sealed and copied to every
provider; lag, changes per second, slot health, each wedding's newest captured change) with its checks
`feed_lag_within_rpo` and `slot_health`, the `change_feed_drain` job and the `change_feed_sensor` that
launches it. Thin wiring over core.changefeed; definitions.py adds the objects listed here."""
from .assets import change_feed, change_feed_drain, change_feed_sensor

asset_defs = [change_feed]
job_defs = [change_feed_drain]
sensor_defs = [change_feed_sensor]
