import uuid

from worker.ids import uuid4_text


def test_uuid4_text_is_a_random_version_4_uuid() -> None:
    seen = {uuid4_text() for _ in range(2000)}  # crosses several pool refills
    assert len(seen) == 2000
    for text in seen:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
