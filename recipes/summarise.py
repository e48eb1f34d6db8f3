"""Markdown table of recipes/accuracy.sh's rows over seeds: mean [min-max] EER and minDCF per row and trial list.

    python recipes/summarise.py ~/.deep-speaker-wd/accuracy/results.csv [more results.csv ...]

Reads the results.csv files that recipes/common.sh writes (row,eer_percent,min_dcf,train_seconds,checkpoints;
no header), keeps the rows named accuracy/<row>/<list>/seed<N> and prints one table line per <row>, in the
order the rows first appear, each trained row's back-end rows (<row>+mean, +asnorm, +averaged) right after it:
for each list, the EER (%) and minDCF as mean [min-max] over the seeds with the number of seeds, then the
training wall time (s) over the seeds, likewise (from test-other's rows; "–" for eval-only rows).
"""
import argparse
import csv
import logging
import re
import statistics
from collections import defaultdict

ROW = re.compile(r'^accuracy/(?P<row>[^/]+)/(?P<list>[^/]+)/seed(?P<seed>\d+)$')
LISTS = ('test-other', 'channels')
BACKENDS = ('', '+mean', '+asnorm', '+averaged')  # eval-only rows follow their trained row, in this order


def results(paths: list) -> dict:
    """{row: {list: {seed: (eer_percent, min_dcf, train_seconds or None)}}} of the results.csv files' accuracy
    rows (a later file's row replaces an earlier one's)."""
    table = defaultdict(lambda: defaultdict(dict))
    for path in paths:
        with open(path, newline='') as f:
            for fields in csv.reader(f):
                match = ROW.match(fields[0]) if fields else None
                if match is None or len(fields) < 4 or not fields[1]:
                    continue
                seconds = float(fields[3]) if fields[3] not in ('', '-') else None
                table[match['row']][match['list']][int(match['seed'])] = (float(fields[1]), float(fields[2]), seconds)
    return table


def spread(values: list, digits: int) -> str:
    """'mean [min-max] (n)' of values, each rounded to `digits` decimals."""
    if not values:
        return '–'
    f = f'{{:.{digits}f}}'
    return f'{f.format(statistics.mean(values))} [{f.format(min(values))}–{f.format(max(values))}] ({len(values)})'


def position(row: str, rows: list) -> tuple:
    """Sort key of a row: the first appearance of its trained row (the row without a back-end suffix), then the
    back-end's place in BACKENDS."""
    suffix = next((b for b in reversed(BACKENDS) if b and row.endswith(b)), '')
    base = row[:len(row) - len(suffix)]
    return (rows.index(base) if base in rows else rows.index(row), BACKENDS.index(suffix))


def markdown(table: dict) -> str:
    """The table's markdown: one line per row, EER and minDCF per list over the seeds, training seconds."""
    lines = ['| row | test-other EER % | test-other minDCF | channels EER % | channels minDCF | training s |',
             '|---|---|---|---|---|---|']
    for row, lists in sorted(table.items(), key=lambda item: position(item[0], list(table))):
        cells = []
        for name in LISTS:
            runs = list(lists.get(name, {}).values())
            cells += [spread([run[0] for run in runs], 2), spread([run[1] for run in runs], 3)]
        seconds = [run[2] for run in lists.get(LISTS[0], {}).values() if run[2] is not None]
        cells.append(spread(seconds, 0) if seconds else '–')
        lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('results_csv', nargs='+', help="recipes/common.sh's results.csv (several: merged)")
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    logging.info(markdown(results(parser.parse_args().results_csv)))


if __name__ == '__main__':
    main()
