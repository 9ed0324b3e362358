"""Default topic names (each configurable through settings)."""
COMMANDS = "segmentation.commands.v1"
DLQ = "segmentation.commands.v1.dlq"
RESULTS = "segmentation.command-results.v1"
MEMBERSHIP_CHANGED = "segmentation.membership-changed.v1"
SEGMENT_CHANGED = "segmentation.segment-changed.v1"


class DefaultTopics:
    """The five default names as attributes, the shape `asyncapi.document` reads (like `Settings`)."""

    commands_topic = COMMANDS
    dlq_topic = DLQ
    results_topic = RESULTS
    membership_topic = MEMBERSHIP_CHANGED
    segment_topic = SEGMENT_CHANGED
