import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { PGlite } from '@electric-sql/pglite';
import fc from 'fast-check';
import {
  IMPLICIT_ZONE,
  SearchValueError,
  dateMatches,
  datePredicate,
  dateRange,
  escapeLike,
  normalizeString,
  numberPredicate,
  numberRange,
  parseQuantity,
  periodRange,
  renumber,
  splitPrefix,
  type InstantRange,
  type Prefix,
} from '../src/fhir/search-values.ts';

// FHIR R4 search values (search.html §3.1.1.4). All values are synthetic. The SQL is checked on
// a real PostgreSQL (PGlite) against the in-memory definitions.

const PREFIXES: Prefix[] = ['eq', 'ne', 'gt', 'lt', 'ge', 'le', 'sa', 'eb', 'ap'];

/** Asserts fn throws a SearchValueError whose detail matches `detail`. */
function throwsDetail(fn: () => unknown, detail: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof SearchValueError, `expected SearchValueError, got ${String(e)}`);
    assert.match(e.detail, detail);
    assert.equal(e.name, 'SearchValueError');
    return true;
  });
}

let db: PGlite;
before(async () => {
  db = await PGlite.create();
});
after(async () => {
  await db?.close();
});

describe('splitPrefix', () => {
  test('removes a known prefix, defaults to eq', () => {
    assert.deepEqual(splitPrefix('ge2019-06'), { prefix: 'ge', value: '2019-06' });
    assert.deepEqual(splitPrefix('ap-5'), { prefix: 'ap', value: '-5' });
    assert.deepEqual(splitPrefix('2019'), { prefix: 'eq', value: '2019' });
    assert.deepEqual(splitPrefix('-0.5'), { prefix: 'eq', value: '-0.5' });
    for (const p of PREFIXES) assert.deepEqual(splitPrefix(`${p}100`), { prefix: p, value: '100' });
  });

  test('refuses an unknown prefix, naming it', () => {
    throwsDetail(() => splitPrefix('xx2019'), /unknown search prefix "xx"/);
    throwsDetail(() => splitPrefix('gq-3'), /"gq"/);
  });

  test('leaves other text for the value parser to judge', () => {
    assert.deepEqual(splitPrefix('abc'), { prefix: 'eq', value: 'abc' });
    assert.deepEqual(splitPrefix('GT5'), { prefix: 'eq', value: 'GT5' });
  });
});

describe('dateRange', () => {
  const r = (lo: string, hi: string): InstantRange => ({ lo, hi });

  test('partial dates cover their whole precision', () => {
    assert.deepEqual(dateRange('2019'), r('2019-01-01T00:00:00.000Z', '2020-01-01T00:00:00.000Z'));
    assert.deepEqual(dateRange('2019-03'), r('2019-03-01T00:00:00.000Z', '2019-04-01T00:00:00.000Z'));
    assert.deepEqual(dateRange('2019-12'), r('2019-12-01T00:00:00.000Z', '2020-01-01T00:00:00.000Z'));
    assert.deepEqual(dateRange('2019-03-04'), r('2019-03-04T00:00:00.000Z', '2019-03-05T00:00:00.000Z'));
    assert.deepEqual(dateRange('2019-12-31'), r('2019-12-31T00:00:00.000Z', '2020-01-01T00:00:00.000Z'));
  });

  test('February: non-leap year ends on the 28th, leap year on the 29th', () => {
    assert.deepEqual(dateRange('2019-02'), r('2019-02-01T00:00:00.000Z', '2019-03-01T00:00:00.000Z'));
    assert.deepEqual(dateRange('2020-02'), r('2020-02-01T00:00:00.000Z', '2020-03-01T00:00:00.000Z'));
    assert.deepEqual(dateRange('2020-02-29'), r('2020-02-29T00:00:00.000Z', '2020-03-01T00:00:00.000Z'));
    assert.deepEqual(dateRange('2000-02-29').lo, '2000-02-29T00:00:00.000Z'); // divisible by 400
    throwsDetail(() => dateRange('2019-02-29'), /day 29 does not exist in 2019-02/);
    throwsDetail(() => dateRange('1900-02-29'), /day 29 does not exist in 1900-02/); // by 100, not 400
  });

  test('times: minutes, seconds and fractional seconds at their precision', () => {
    assert.deepEqual(
      dateRange('2019-03-04T10:20Z'),
      r('2019-03-04T10:20:00.000Z', '2019-03-04T10:21:00.000Z'),
    );
    assert.deepEqual(
      dateRange('2019-03-04T10:20:30Z'),
      r('2019-03-04T10:20:30.000Z', '2019-03-04T10:20:31.000Z'),
    );
    assert.deepEqual(
      dateRange('2019-03-04T10:20:30.5Z'),
      r('2019-03-04T10:20:30.500Z', '2019-03-04T10:20:30.600Z'),
    );
    assert.deepEqual(
      dateRange('2019-03-04T10:20:30.25Z'),
      r('2019-03-04T10:20:30.250Z', '2019-03-04T10:20:30.260Z'),
    );
    assert.deepEqual(
      dateRange('2019-03-04T10:20:30.123Z'),
      r('2019-03-04T10:20:30.123Z', '2019-03-04T10:20:30.124Z'),
    );
    // Finer than ms: widened outward to whole ms, never to an empty range.
    assert.deepEqual(
      dateRange('2019-03-04T10:20:30.1234Z'),
      r('2019-03-04T10:20:30.123Z', '2019-03-04T10:20:30.124Z'),
    );
    assert.deepEqual(
      dateRange('2019-03-04T10:20:59.9999Z'),
      r('2019-03-04T10:20:59.999Z', '2019-03-04T10:21:00.000Z'),
    );
    // The last second of a year rolls into the next year.
    assert.deepEqual(
      dateRange('2019-12-31T23:59:59.9Z'),
      r('2019-12-31T23:59:59.900Z', '2020-01-01T00:00:00.000Z'),
    );
  });

  test('time zones are applied; a zone-less value is UTC', () => {
    assert.equal(IMPLICIT_ZONE, 'UTC');
    assert.deepEqual(dateRange('2019-03-04T23:30:00-05:00'), dateRange('2019-03-05T04:30:00Z'));
    assert.deepEqual(dateRange('2019-03-05T01:30:00+05:30'), dateRange('2019-03-04T20:00:00Z'));
    assert.deepEqual(dateRange('2019-03-04T10:20:30'), dateRange('2019-03-04T10:20:30Z'));
    assert.deepEqual(dateRange('2019-03-04T10:20'), dateRange('2019-03-04T10:20Z'));
    assert.deepEqual(dateRange('2019-03-04T10:20-00:00'), dateRange('2019-03-04T10:20Z'));
    // The extreme offsets are allowed.
    assert.equal(dateRange('2019-03-04T12:00+14:00').lo, '2019-03-03T22:00:00.000Z');
    assert.equal(dateRange('2019-03-04T12:00-14:00').lo, '2019-03-05T02:00:00.000Z');
  });

  test('years 0001-9999; beyond them the bound is open', () => {
    // Date.UTC maps years 0-99 to the 1900s; we must not.
    assert.deepEqual(dateRange('0050'), r('0050-01-01T00:00:00.000Z', '0051-01-01T00:00:00.000Z'));
    assert.equal(dateRange('0001').lo, '0001-01-01T00:00:00.000Z');
    assert.deepEqual(dateRange('9999'), r('9999-01-01T00:00:00.000Z', 'infinity'));
    assert.deepEqual(dateRange('9999-12-31T23:00-05:00'), r('infinity', 'infinity'));
  });

  test('malformed values throw with a detail naming the problem', () => {
    const cases: [string, RegExp][] = [
      ['2019-13', /^date value "2019-13" is not a valid FHIR date: month 13 is not in 01\.\.12$/],
      ['2019-00', /month 00/],
      ['2019-02-30', /day 30 does not exist in 2019-02/],
      ['2019-04-31', /day 31 does not exist in 2019-04/],
      ['2019-03-00', /day 00/],
      ['2019-3', /"2019-3".*expected YYYY, YYYY-MM/],
      ['20190304', /"20190304".*expected/],
      ['2019-03-04T25:00Z', /hour 25 is not in 00\.\.23/],
      ['2019-03-04T24:00Z', /hour 24/],
      ['2019-03-04T10:60Z', /minute 60/],
      ['2019-03-04T10:00:60Z', /second 60/],
      ['2019-03-04T10:00+15:00', /time zone offset \+15:00 is outside -14:00\.\.\+14:00/],
      ['2019-03-04T10:00-14:30', /offset -14:30/],
      ['2019-03-04T10:00+05:60', /offset \+05:60/],
      ['0000', /year 0000/],
      ['abc', /"abc".*expected/],
      ['', /^date value is empty$/],
      [' 2019', /whitespace/],
      ['2019-03-04\n', /whitespace/],
      ['2019-03-04T10Z', /expected/], // hours alone are not a precision
      ['2019-03-04Z', /expected/], // a zone needs a time
      ['2019-03-04T10:20:30.Z', /expected/],
      ['2019-03-04T10:20:30.1234567891Z', /more than 9 fractional digits/],
      ['2019-03-04 10:20:30Z', /expected/],
      ['2019-03-04T10:20:30+0500', /expected/],
      ['+2019', /expected/],
    ];
    for (const [value, detail] of cases) throwsDetail(() => dateRange(value), detail);
  });

  test('a long bad value is truncated in the detail', () => {
    throwsDetail(() => dateRange('9'.repeat(500)), /"9{48}…"/);
  });
});

describe('periodRange', () => {
  test('start of start to end of end, open where missing', () => {
    assert.deepEqual(periodRange('2019-05-01', '2019-06-15'), {
      lo: '2019-05-01T00:00:00.000Z',
      hi: '2019-06-16T00:00:00.000Z',
    });
    assert.deepEqual(periodRange(undefined, '2019'), { lo: '-infinity', hi: '2020-01-01T00:00:00.000Z' });
    assert.deepEqual(periodRange('2019-03-04T10:00:00+01:00', undefined), {
      lo: '2019-03-04T09:00:00.000Z',
      hi: 'infinity',
    });
    assert.equal(periodRange(undefined, undefined), undefined);
    // Same day at both ends is a one-day period.
    assert.deepEqual(periodRange('2019-05-01', '2019-05-01'), dateRange('2019-05-01'));
  });

  test('an inverted period or a bad date is refused', () => {
    throwsDetail(() => periodRange('2019-05-02', '2019-05-01'), /period start "2019-05-02" is not before/);
    throwsDetail(() => periodRange('2019-05-01', '2019-13'), /month 13/);
    throwsDetail(() => periodRange('', undefined), /empty/);
  });
});

describe('date prefixes', () => {
  // A resource period 2019-05-01..2019-06-15, i.e. [05-01, 06-16).
  const period = periodRange('2019-05-01', '2019-06-15')!;
  const NOW = new Date('2019-05-10T00:00:00Z');

  // Hand-worked against R4's literal definitions (see the comments in search-values.ts).
  const cases: [string, boolean][] = [
    ['eq2019', true], // within the year
    ['eq2019-05', false], // runs into June
    ['ne2019-05', true],
    ['ne2019', false],
    ['gt2019-05', true], // June part lies above May
    ['gt2019-06', false], // nothing after June
    ['gt2019-06-15', false], // ends with that day
    ['gt2019-06-14', true],
    ['ge2019-06', false], // not above June, not within June
    ['ge2019-05-01', true], // above that day
    ['ge2019-05', true], // likewise above May
    ['ge2019-06-15', false],
    ['ge2019', true], // within the year
    ['lt2019-05', false], // nothing before May
    ['lt2019-05-02', true],
    ['lt2019-06', true],
    ['le2019-05', false], // neither below nor within May
    ['le2019-06-15', true],
    ['le2019', true],
    ['sa2019-04', true], // starts right when April ends
    ['sa2019-05', false],
    ['sa2019-04-30T23:59:59Z', true],
    ['eb2019-06-16', true], // ends right when that day starts
    ['eb2019-06-15', false],
    ['eb2019-06-16T00:00:00.001Z', true],
    // ap, now = 2019-05-10: 2019-04 is 9 days before now, widened 0.9 day each side: reaches May 1.
    ['ap2019-04', true],
    // 2019-04-29 is 10 days before now: widened by a day to [04-28, 05-01), still ends at 05-01.
    ['ap2019-04-29', false],
    ['ap2019-06-20', true], // 41 days after now: widened 4.1 days, reaches back to 06-15
    ['ap2019-06-25', false],
    ['ap2018', false],
  ];

  test('hand-worked examples, in memory and on PostgreSQL', async () => {
    await db.exec(`CREATE TEMP TABLE one (lo timestamptz NOT NULL, hi timestamptz NOT NULL)`);
    await db.query(`INSERT INTO one VALUES ($1, $2)`, [period.lo, period.hi]);
    for (const [raw, expected] of cases) {
      const { prefix, value } = splitPrefix(raw);
      const search = dateRange(value);
      assert.equal(dateMatches(prefix, search, period, NOW), expected, `memory ${raw}`);
      const { sql, params } = datePredicate(prefix, search, NOW);
      const res = await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM one WHERE ${sql}`, params);
      assert.equal(res.rows[0]?.n, expected ? 1 : 0, `sql ${raw}: ${sql} ${params.join(' ')}`);
    }
    await db.exec(`DROP TABLE one`);
  });

  test('open-ended resource ranges', () => {
    const since2019 = periodRange('2019', undefined)!;
    const until2019 = periodRange(undefined, '2019')!;
    const search = dateRange('2019-06');
    assert.equal(dateMatches('gt', search, since2019), true);
    assert.equal(dateMatches('lt', search, since2019), true); // January lies below June
    assert.equal(dateMatches('eq', search, since2019), false);
    assert.equal(dateMatches('sa', search, since2019), false);
    assert.equal(dateMatches('sa', search, periodRange('2019-07', undefined)!), true);
    assert.equal(dateMatches('lt', search, until2019), true);
    assert.equal(dateMatches('sa', search, until2019), false);
    assert.equal(dateMatches('eb', dateRange('2020'), until2019), true);
  });

  test('ap widens by 10% of the gap to now, at least 12 hours a side', () => {
    // 2009 is 10 years (3652 days) before now: 365.2 days a side.
    assert.deepEqual(datePredicate('ap', dateRange('2009'), new Date('2020-01-01T00:00:00Z')), {
      sql: '(lo < $1::timestamptz AND hi > $2::timestamptz)',
      params: ['2011-01-01T04:48:00.000Z', '2008-01-01T19:12:00.000Z'],
    });
    // Gap 0 (now inside the range): a day in total.
    assert.deepEqual(datePredicate('ap', dateRange('2019-04-30'), new Date('2019-04-30T12:00:00Z')).params, [
      '2019-05-01T12:00:00.000Z',
      '2019-04-29T12:00:00.000Z',
    ]);
    // Future value, gap of 30 days: 3 days a side.
    assert.deepEqual(datePredicate('ap', dateRange('2019-05-31'), new Date('2019-05-01T00:00:00Z')).params, [
      '2019-06-04T00:00:00.000Z',
      '2019-05-28T00:00:00.000Z',
    ]);
  });

  test('exact SQL forms: plain column-against-parameter comparisons', () => {
    const s = dateRange('2019-03');
    const [lo, hi] = [s.lo, s.hi];
    const expect: Record<Exclude<Prefix, 'ap'>, [string, string[]]> = {
      eq: ['(lo >= $1::timestamptz AND hi <= $2::timestamptz)', [lo, hi]],
      ne: ['(lo < $1::timestamptz OR hi > $2::timestamptz)', [lo, hi]],
      gt: ['hi > $1::timestamptz', [hi]],
      lt: ['lo < $1::timestamptz', [lo]],
      ge: ['(hi > $1::timestamptz OR lo >= $2::timestamptz)', [hi, lo]],
      le: ['(lo < $1::timestamptz OR hi <= $2::timestamptz)', [lo, hi]],
      sa: ['lo >= $1::timestamptz', [hi]],
      eb: ['hi <= $1::timestamptz', [lo]],
    };
    for (const [p, [sql, params]] of Object.entries(expect)) {
      assert.deepEqual(datePredicate(p as Prefix, s), { sql, params }, p);
    }
  });

  test('a btree on lo or hi serves every prefix', async () => {
    await db.exec(`
      CREATE TEMP TABLE idx (id serial PRIMARY KEY, lo timestamptz NOT NULL, hi timestamptz NOT NULL);
      INSERT INTO idx (lo, hi)
        SELECT t, t + interval '1 day' FROM generate_series('2000-01-01'::timestamptz, '2030-01-01', '1 day') t;
      CREATE INDEX idx_lo ON idx (lo);
      CREATE INDEX idx_hi ON idx (hi);
      ANALYZE idx;
      SET enable_seqscan = off;
    `);
    try {
      for (const p of PREFIXES) {
        const { sql, params } = datePredicate(p, dateRange('2019-03'), new Date('2019-03-10T00:00:00Z'));
        const plan = await db.query<{ 'QUERY PLAN': string }>(
          `EXPLAIN SELECT id FROM idx WHERE ${sql}`,
          params,
        );
        const text = plan.rows.map((row) => row['QUERY PLAN']).join('\n');
        assert.doesNotMatch(text, /Seq Scan/, `${p}:\n${text}`);
        assert.match(text, /idx_(lo|hi)/, `${p}:\n${text}`);
      }
    } finally {
      await db.exec(`RESET enable_seqscan; DROP TABLE idx;`);
    }
  });
});

describe('datePredicate agrees with dateMatches on PostgreSQL', () => {
  const searchValues = [
    '2019',
    '2019-03',
    '2019-03-04',
    '2019-03-04T10:20Z',
    '2019-03-04T10:20:30.5Z',
    '2019-03-04T23:30:00-05:00',
    '2019-02',
    '2018-12-31T23:59:59.999Z',
  ];
  const searches: InstantRange[] = [
    ...searchValues.map(dateRange),
    { lo: '-infinity', hi: '2019-03-04T00:00:00.000Z' },
    { lo: '2019-03-04T00:00:00.000Z', hi: 'infinity' },
    { lo: '-infinity', hi: 'infinity' },
  ];
  const nows = [
    new Date('2019-03-04T10:20:30.000Z'),
    new Date('2024-07-01T00:00:00Z'),
    new Date('2010-01-01Z'),
  ];

  async function compare(
    table: string,
    resources: InstantRange[],
    search: InstantRange,
    p: Prefix,
    now: Date,
  ) {
    const { sql, params } = datePredicate(p, search, now);
    const got = (
      await db.query<{ id: number }>(`SELECT id FROM ${table} WHERE ${sql} ORDER BY id`, params)
    ).rows.map((row) => row.id);
    const want = resources.flatMap((r, i) => (dateMatches(p, search, r, now) ? [i] : []));
    assert.deepEqual(got, want, `${p} ${JSON.stringify(search)} now=${now.toISOString()}`);
  }

  async function load(table: string, resources: InstantRange[]): Promise<void> {
    await db.exec(
      `CREATE TEMP TABLE ${table} (id int PRIMARY KEY, lo timestamptz NOT NULL, hi timestamptz NOT NULL)`,
    );
    for (const [i, r] of resources.entries()) {
      await db.query(`INSERT INTO ${table} VALUES ($1, $2, $3)`, [i, r.lo, r.hi]);
    }
  }

  test('grid: every range between search bounds and their 1 ms neighbours', async () => {
    // Resource bounds at, just before and just after every search bound, so each `<` vs `<=`
    // matters somewhere.
    const ms = new Set<number>();
    for (const s of searches) {
      for (const b of [s.lo, s.hi]) {
        const t = Date.parse(b);
        if (Number.isFinite(t)) for (const d of [-1, 0, 1]) ms.add(t + d);
      }
    }
    const points = [
      '-infinity',
      ...[...ms].sort((a, b) => a - b).map((t) => new Date(t).toISOString()),
      'infinity',
    ];
    const resources: InstantRange[] = [];
    for (let i = 0; i < points.length; i++) {
      for (let j = i + 1; j < points.length; j++) resources.push({ lo: points[i]!, hi: points[j]! });
    }
    await load('grid', resources);
    let matched = 0;
    for (const s of searches) {
      for (const p of PREFIXES) {
        for (const now of nows) await compare('grid', resources, s, p, now);
        matched += resources.filter((r) => dateMatches(p, s, r, nows[0])).length;
      }
    }
    // Guard against a vacuous comparison (e.g. everything false on both sides).
    assert.ok(matched > 1000 && matched < resources.length * searches.length * PREFIXES.length);
    await db.exec(`DROP TABLE grid`);
  });

  test('random ranges and instants (fast-check)', async () => {
    const t0 = Date.parse('2018-06-01T00:00:00Z');
    const span = 2 * 365 * 86_400_000;
    // Instants snapped to coarse steps now and then so that equal bounds occur often.
    const instant = fc.oneof(
      fc.integer({ min: 0, max: span }).map((d) => t0 + d),
      fc.integer({ min: 0, max: 730 }).map((d) => t0 + d * 86_400_000),
    );
    const range = fc
      .tuple(instant, instant, fc.constantFrom('none', 'lo', 'hi'))
      .filter(([a, b]) => a !== b)
      .map(([a, b, open]): InstantRange => ({
        lo: open === 'lo' ? '-infinity' : new Date(Math.min(a, b)).toISOString(),
        hi: open === 'hi' ? 'infinity' : new Date(Math.max(a, b)).toISOString(),
      }));
    const resources = fc.sample(range, { numRuns: 300, seed: 42 });
    await load('rnd', resources);
    await fc.assert(
      fc.asyncProperty(range, fc.constantFrom(...PREFIXES), instant, async (search, p, now) => {
        await compare('rnd', resources, search, p, new Date(now));
      }),
      { numRuns: 300, seed: 7 },
    );
    await db.exec(`DROP TABLE rnd`);
  });
});

describe('renumber', () => {
  test('shifts every placeholder, multi-digit ones too', () => {
    assert.equal(
      renumber('(lo >= $1::timestamptz AND hi <= $2::timestamptz)', 3),
      '(lo >= $4::timestamptz AND hi <= $5::timestamptz)',
    );
    assert.equal(renumber('a = $9 OR b = $10', 2), 'a = $11 OR b = $12');
    assert.equal(renumber('x = $1', 0), 'x = $1');
    assert.throws(() => renumber('x = $1', -1), RangeError);
  });

  test('combined predicates run with their params concatenated', async () => {
    const a = datePredicate('ge', dateRange('2019'));
    const b = datePredicate('lt', dateRange('2020'));
    const sql = `SELECT ('2019-06-01'::timestamptz, '2019-07-01'::timestamptz) AS r
      FROM (SELECT '2019-06-01'::timestamptz AS lo, '2019-07-01'::timestamptz AS hi) t
      WHERE ${a.sql} AND ${renumber(b.sql, a.params.length)}`;
    const res = await db.query(sql, [...a.params, ...b.params]);
    assert.equal(res.rows.length, 1);
  });
});

describe('numbers', () => {
  test('implicit range from the precision, exact decimals', () => {
    assert.deepEqual(numberRange('100'), { lo: '99.5', hi: '100.5', value: '100' });
    assert.deepEqual(numberRange('100.00'), { lo: '99.995', hi: '100.005', value: '100.00' });
    // One significant figure: ± half of 100.
    assert.deepEqual(numberRange('1e2'), { lo: '50', hi: '150', value: '100' });
    // Two significant figures: ± half of 10 (the [95 ... 105) R4's table prints for "1e2").
    assert.deepEqual(numberRange('1.0E2'), { lo: '95', hi: '105', value: '100' });
    assert.deepEqual(numberRange('-0.5'), { lo: '-0.55', hi: '-0.45', value: '-0.5' });
    assert.deepEqual(numberRange('-1e2'), { lo: '-150', hi: '-50', value: '-100' });
    assert.deepEqual(numberRange('0'), { lo: '-0.5', hi: '0.5', value: '0' });
    // Floating point would give 0.15000000000000002.
    assert.deepEqual(numberRange('0.1'), { lo: '0.05', hi: '0.15', value: '0.1' });
    assert.deepEqual(numberRange('1.5e-3'), { lo: '0.00145', hi: '0.00155', value: '0.0015' });
    assert.deepEqual(numberRange('12345678901234567890.1'), {
      lo: '12345678901234567890.05',
      hi: '12345678901234567890.15',
      value: '12345678901234567890.1',
    });
  });

  test('anything but a FHIR decimal is refused', () => {
    for (const bad of [
      '1,5',
      '0x10',
      'NaN',
      'Infinity',
      '+1',
      '.5',
      '1.',
      '01',
      '1e',
      '- 1',
      ' 1',
      '1 ',
      'abc',
    ]) {
      throwsDetail(
        () => numberRange(bad),
        new RegExp(`^number value ${JSON.stringify(bad).replace(/[.+]/g, '\\$&')} is not a valid`),
      );
    }
    throwsDetail(() => numberRange(''), /^number value is empty$/);
    throwsDetail(() => numberRange('1e99999'), /exponent out of range/);
  });

  test('predicates on PostgreSQL numeric', async () => {
    const values = [
      '-110',
      '-100',
      '-90',
      '-0.5',
      '0',
      '0.5',
      '89.999',
      '90',
      '99.4',
      '99.5',
      '99.99',
      '100',
    ];
    values.push('100.4999', '100.5', '101', '110', '110.0001');
    async function match(raw: string): Promise<string[]> {
      const { prefix, value } = splitPrefix(raw);
      const { sql, params } = numberPredicate(prefix, numberRange(value));
      const res = await db.query<{ v: string }>(
        `SELECT num::text AS v FROM unnest($${params.length + 1}::numeric[]) AS num WHERE ${sql} ORDER BY num`,
        [...params, `{${values.join(',')}}`],
      );
      return res.rows.map((row) => row.v);
    }
    assert.deepEqual(await match('100'), ['99.5', '99.99', '100', '100.4999']);
    assert.deepEqual(await match('eq100'), ['99.5', '99.99', '100', '100.4999']);
    assert.deepEqual(await match('100.0'), ['99.99', '100']);
    assert.deepEqual(await match('1e2'), [
      '89.999',
      '90',
      '99.4',
      '99.5',
      '99.99',
      '100',
      '100.4999',
      '100.5',
      '101',
      '110',
      '110.0001',
    ]);
    assert.deepEqual(await match('ne100'), [
      '-110',
      '-100',
      '-90',
      '-0.5',
      '0',
      '0.5',
      '89.999',
      '90',
      '99.4',
      '100.5',
      '101',
      '110',
      '110.0001',
    ]);
    // gt/lt/ge/le compare with exactly 100.
    assert.deepEqual(await match('gt100'), ['100.4999', '100.5', '101', '110', '110.0001']);
    assert.deepEqual(await match('sa100'), await match('gt100'));
    assert.deepEqual(await match('ge100'), ['100', '100.4999', '100.5', '101', '110', '110.0001']);
    assert.deepEqual(await match('lt-0.5'), ['-110', '-100', '-90']);
    assert.deepEqual(await match('eb-0.5'), await match('lt-0.5'));
    assert.deepEqual(await match('le-0.5'), ['-110', '-100', '-90', '-0.5']);
    // ap: ±10%, inclusive; a negative value swaps the bounds.
    assert.deepEqual(await match('ap100'), [
      '90',
      '99.4',
      '99.5',
      '99.99',
      '100',
      '100.4999',
      '100.5',
      '101',
      '110',
    ]);
    assert.deepEqual(await match('ap-100'), ['-110', '-100', '-90']);
    // ... but never narrower than eq: ap0 is not "exactly 0".
    assert.deepEqual(await match('ap0'), ['-0.5', '0', '0.5']);
  });

  test('ap bounds are exact decimals', () => {
    assert.deepEqual(numberPredicate('ap', numberRange('-100')), {
      sql: '(num >= $1::numeric AND num <= $2::numeric)',
      params: ['-110.0', '-90.0'],
    });
    assert.deepEqual(numberPredicate('ap', numberRange('0.3')).params, ['0.25', '0.35']);
    assert.deepEqual(numberPredicate('ap', numberRange('3.00')).params, ['2.700', '3.300']);
  });
});

describe('parseQuantity', () => {
  test('number|system|code, number||code, number', () => {
    assert.deepEqual(parseQuantity('5.4|http://unitsofmeasure.org|mg'), {
      prefix: 'eq',
      number: { lo: '5.35', hi: '5.45', value: '5.4' },
      system: 'http://unitsofmeasure.org',
      code: 'mg',
    });
    assert.deepEqual(parseQuantity('le5.4||mg'), {
      prefix: 'le',
      number: { lo: '5.35', hi: '5.45', value: '5.4' },
      code: 'mg',
    });
    assert.deepEqual(parseQuantity('gt-1e2'), {
      prefix: 'gt',
      number: { lo: '-150', hi: '-50', value: '-100' },
    });
  });

  test('malformed quantities throw', () => {
    throwsDetail(() => parseQuantity('5.4|mg'), /has 2 '\|'-separated parts/);
    throwsDetail(() => parseQuantity('5.4|a|b|c'), /has 4 '\|'-separated parts/);
    throwsDetail(() => parseQuantity('5.4|http://unitsofmeasure.org|'), /no code/);
    throwsDetail(() => parseQuantity('xx5.4||mg'), /unknown search prefix "xx"/);
    throwsDetail(() => parseQuantity('5,4||mg'), /number value "5,4" is not a valid FHIR decimal/);
    throwsDetail(() => parseQuantity('||mg'), /number value is empty/);
  });
});

describe('strings', () => {
  test('normalizeString folds case, accents, compatibility forms and whitespace', () => {
    assert.equal(normalizeString('Zoë'), 'zoe');
    assert.equal(normalizeString('Zoe\u0308'), 'zoe'); // already decomposed
    assert.equal(normalizeString('ÅNGSTRÖM'), 'angstrom');
    assert.equal(normalizeString('\u212Bngstr\u00F6m'), 'angstrom'); // U+212B ANGSTROM SIGN
    assert.equal(normalizeString('İstanbul'), 'istanbul'); // lower-casing adds a dot above
    assert.equal(normalizeString('ﬁnn'), 'finn');
    assert.equal(normalizeString('Ｚｏｅ'), 'zoe'); // full-width
    assert.equal(normalizeString('  Mary \t\n Ann\u00A0 Lee  '), 'mary ann lee');
    assert.equal(normalizeString('Łukasz'), 'łukasz'); // a stroke is not a combining mark
  });

  test('escapeLike escapes backslash, percent and underscore', async () => {
    assert.equal(escapeLike('a%b_c\\d'), 'a\\%b\\_c\\\\d');
    assert.equal(escapeLike('plain'), 'plain');
    const like = async (text: string, prefix: string): Promise<boolean> =>
      (await db.query<{ m: boolean }>(`SELECT $1 LIKE $2 ESCAPE '\\' AS m`, [text, `${escapeLike(prefix)}%`]))
        .rows[0]!.m;
    assert.equal(await like('100% wool', '100%'), true);
    assert.equal(await like('1000 wool', '100%'), false);
    assert.equal(await like('a_b', 'a_'), true);
    assert.equal(await like('axb', 'a_'), false);
    assert.equal(await like('c:\\dir', 'c:\\'), true);
    assert.equal(await like('c:/dir', 'c:\\'), false);
  });
});
