import pytest

from herd.platform.config import MAVERICK, Limits, PlatformConfig, Price, herd_home, load_config, parse_config


def test_maverick_defaults():
    c = PlatformConfig()
    p = c.price_for(MAVERICK)
    assert (p.input, p.output) == (0.27, 0.85)
    assert p.blended == pytest.approx(0.415)  # (3 x 0.27 + 0.85) / 4, the model card's 3:1 figure
    assert c.limits == Limits()
    assert c.limits.default_reserve_tokens > 0
    assert not c.require_api_key


def test_cost_per_million():
    p = Price(0.27, 0.85)
    assert p.cost(1_000_000, 0) == pytest.approx(0.27)
    assert p.cost(0, 1_000_000) == pytest.approx(0.85)
    assert p.cost(1000, 500) == pytest.approx((1000 * 0.27 + 500 * 0.85) / 1e6)
    # Cached prompt tokens cost the input price unless a cached price is set.
    assert p.cost(1000, 0, cached_tokens=400) == p.cost(1000, 0)
    assert Price(0.27, 0.85, cached_input=0.0).cost(1000, 0, cached_tokens=400) == pytest.approx(600 * 0.27 / 1e6)


def test_load_toml(tmp_path):
    f = tmp_path / "herd.toml"
    f.write_text(
        """
[database]
url = "postgresql://herd@localhost/herd"
[auth]
require_api_key = true
[limits]
rpm = 10
tpm = 5000
default_reserve_tokens = 256
[pricing]
input = 0.5
output = 1.5
[pricing.models."small"]
input = 0.1
[server]
something_else = 1
"""
    )
    c = load_config(f)
    assert c.database_url == "postgresql://herd@localhost/herd"
    assert c.require_api_key
    assert (c.limits.rpm, c.limits.tpm, c.limits.default_reserve_tokens) == (10, 5000, 256)
    assert c.price_for("unlisted") == Price(0.5, 1.5)
    assert c.price_for("small") == Price(0.1, 1.5)  # unset fields inherit [pricing]
    assert c.resolved_database_url() == "postgresql://herd@localhost/herd"


def test_default_file_is_in_herd_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    monkeypatch.delenv("HERD_DATABASE_URL", raising=False)
    assert herd_home() == tmp_path
    assert load_config() == PlatformConfig()  # no file: defaults
    assert load_config().resolved_database_url() == f"sqlite:///{tmp_path / 'herd.db'}"
    (tmp_path / "herd.toml").write_text("[limits]\nrpm = 7\n")
    assert load_config().limits.rpm == 7
    monkeypatch.setenv("HERD_DATABASE_URL", "sqlite:////elsewhere.db")
    assert load_config().resolved_database_url() == "sqlite:////elsewhere.db"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[limits]\nrpm = -1\n", "limits.rpm"),
        ("[limits]\ntpm = 'many'\n", "limits.tpm"),
        ("[pricing]\ninput = -0.1\n", "pricing.input"),
        ("[pricing]\nbogus = 1\n", "unknown price field"),
        ("[auth]\nrequire_api_key = 'yes'\n", "require_api_key"),
        ("[limits\n", "herd.toml"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, message):
    f = tmp_path / "herd.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(f)


def test_parse_ignores_other_tables():
    assert parse_config({"server": {"port": 1}}) == PlatformConfig()


def test_batch_table():
    from herd.platform.config import parse_config

    c = parse_config({"batch": {"discount": 0.4, "max_in_flight": 16, "busy_max_in_flight": 1, "tpm": 5000,
                                "files_dir": "/data/files"}})
    b = c.batch
    assert (b.discount, b.max_in_flight, b.busy_max_in_flight, b.tpm, b.rpm, b.priority) == (0.4, 16, 1, 5000, 0, 1)
    assert str(b.resolved_files_dir()) == "/data/files"
    assert parse_config({}).batch.discount == 0.5
    for bad in ({"discount": 1.5}, {"max_in_flight": 0}, {"priority": "low"}, {"nope": 1}):
        with pytest.raises(ValueError, match="batch"):
            parse_config({"batch": bad})
