import math

from jobs.text_tables import format_number, markdown_table


def test_missing_and_non_finite_numbers_print_as_a_dash():
    assert [format_number(v) for v in (None, math.nan, math.inf)] == ["-", "-", "-"]
    assert format_number(0.43456) == "0.435" and format_number(7.994, 2) == "7.99"


def test_a_markdown_table_has_header_separator_and_one_line_per_row():
    assert markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| 1 | 2 |",
        "| 3 | 4 |",
    ]
