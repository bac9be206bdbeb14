"""The one text-table formatter: alignment, "-" for missing values, widths, the rule."""

from neox_jax import table

COLUMNS = [table.Column("name", "name", align="<"), table.Column("tok/s", "rate", ",.0f"),
           table.Column("share", lambda r: r.get("part"), ".1%", width=7)]


def test_columns_align_and_size_to_their_widest_cell():
    text = table.render(COLUMNS, [{"name": "neox_jax", "rate": 1234.5, "part": 0.25},
                                  {"name": "hf", "rate": 12.0, "part": 1.0}])
    assert text.splitlines() == ["name     tok/s   share",
                                 "----------------------",
                                 "neox_jax 1,234   25.0%",
                                 "hf          12  100.0%"]


def test_missing_values_are_a_dash_and_the_format_is_not_called():
    def never(v):
        raise AssertionError(v)

    columns = [table.Column("a", "a", never), table.Column("b", 1, never), table.Column("c", lambda r: None, never)]
    rows = [{"a": None}, {}]  # None, a mapping's missing key
    assert table.render(columns[:1], rows).splitlines()[2:] == ["-", "-"]
    assert table.render(columns[1:], [("x", None)]).splitlines()[2] == "- -"  # a sequence's index; a function


def test_width_is_a_minimum_and_a_long_cell_widens_its_column():
    columns = [table.Column("k", 0, align="<", width=6), table.Column("v", 1, width=4)]
    assert table.render(columns, [("a", 1)]).splitlines() == ["k         v", "-" * 11, "a         1"]
    lines = table.render(columns, [("a", 1), ("a long key", 22)]).splitlines()
    assert lines == ["k             v", "-" * 15, "a             1", "a long key   22"]


def test_gap_trailing_spaces_and_a_table_without_rows():
    columns = [table.Column("run", "run", align="<"), table.Column("note", "note", align="<")]
    lines = table.render(columns, [{"run": "a", "note": "long note"}, {"run": "bb", "note": ""}], gap="  ").splitlines()
    assert lines == ["run  note", "-" * 14, "a    long note", "bb"]
    assert table.render(columns, []) == "run note\n--------"
