import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { startHarness, testPatient, HTEST, type Harness } from './support/harness.ts';

let h: Harness;
const ids: Record<string, string> = {};

type Bundle = { total?: number; link: { relation: string; url: string }[]; entry: Record<string, any>[] };

async function search(path: string, init: Parameters<Harness['fhir']>[1] = {}): Promise<Bundle> {
  const res = await h.fhir(path, init);
  const body = (await res.json()) as Bundle & { issue?: unknown };
  assert.equal(res.status, 200, `${path}: ${JSON.stringify(body)}`);
  return body;
}
/** Ids of the `match` entries, sorted unless `ordered`. */
async function matchIds(path: string, ordered = false): Promise<string[]> {
  const b = await search(path);
  const out = b.entry.filter((e) => e.search?.mode === 'match').map((e) => e.resource.id as string);
  const named = (ordered ? out : out.sort()).map((id) => Object.keys(ids).find((k) => ids[k] === id) ?? id);
  if (process.env.SEARCH_DEBUG) console.log(path, named);
  return ordered ? out : out.sort();
}
const sorted = (...names: string[]) => names.map((n) => ids[n]!).sort();

async function create(resource: Record<string, unknown>): Promise<string> {
  const res = await h.fhir(`/${resource.resourceType as string}`, {
    method: 'POST',
    body: JSON.stringify({ meta: { security: [HTEST] }, ...resource }),
  });
  const body = (await res.json()) as { id: string };
  assert.equal(res.status, 201, JSON.stringify(body));
  return body.id;
}

const LOINC = 'http://loinc.org';
const CATEGORY = 'http://terminology.hl7.org/CodeSystem/observation-category';

before(async () => {
  h = await startHarness();
  ids.a = await create(
    testPatient({
      name: [{ family: 'Zzyzxa', given: ['Álvaro'] }],
      gender: 'female',
      birthDate: '1970-03-04',
      identifier: [
        {
          system: 'urn:test:mrn',
          value: 'MRN-SEARCH-A',
          type: { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/v2-0203', code: 'MR' }] },
        },
      ],
    }),
  );
  ids.b = await create(
    testPatient({
      name: [{ family: 'Zzyzxb', given: ['Bob'] }],
      gender: 'male',
      birthDate: '1970',
      identifier: [{ system: 'urn:test:mrn', value: 'MRN-SEARCH-B' }],
    }),
  );
  ids.c = await create(
    testPatient({
      name: [{ family: 'Otherfamily', given: ['Cy'] }],
      gender: 'other',
      birthDate: '1985-07-09',
    }),
  );
  ids.height = await create({
    resourceType: 'Observation',
    status: 'final',
    category: [{ coding: [{ system: CATEGORY, code: 'vital-signs' }] }],
    code: { coding: [{ system: LOINC, code: '8302-2', display: 'Body height' }] },
    subject: { reference: `Patient/${ids.a}` },
    effectiveDateTime: '2019-03-04T10:00:00-05:00',
    valueQuantity: { value: 170, unit: 'cm', system: 'http://unitsofmeasure.org', code: 'cm' },
  });
  ids.hgb = await create({
    resourceType: 'Observation',
    status: 'final',
    category: [{ coding: [{ system: CATEGORY, code: 'laboratory' }] }],
    code: { coding: [{ system: LOINC, code: '718-7', display: 'Hemoglobin' }] },
    subject: { reference: `Patient/${ids.a}` },
    effectivePeriod: { start: '2019-05-01', end: '2019-06-15' },
    valueQuantity: { value: 13.5, unit: 'g/dL', system: 'http://unitsofmeasure.org', code: 'g/dL' },
  });
  ids.bHeight = await create({
    resourceType: 'Observation',
    status: 'final',
    category: [{ coding: [{ system: CATEGORY, code: 'vital-signs' }] }],
    code: { coding: [{ system: LOINC, code: '8302-2' }] },
    subject: { reference: `Patient/${ids.b}` },
    effectiveDateTime: '2020',
    valueQuantity: { value: 150, unit: 'cm', system: 'http://unitsofmeasure.org', code: 'cm' },
  });
});
after(async () => {
  await h?.close();
});

describe('search parameter types', () => {
  test('string: prefix by default, accent- and case-insensitive; :exact and :contains', async () => {
    assert.deepEqual(await matchIds('/Patient?name=alv'), sorted('a'));
    assert.deepEqual(await matchIds('/Patient?family=ZZYZX'), sorted('a', 'b'));
    assert.deepEqual(await matchIds('/Patient?given:exact=%C3%81lvaro'), sorted('a'));
    assert.deepEqual(await matchIds('/Patient?given:exact=alvaro'), []);
    assert.deepEqual(await matchIds('/Patient?family:contains=yzxb'), sorted('b'));
    // OR with commas, AND with repeated parameters.
    assert.deepEqual(await matchIds('/Patient?family=zzyzxa,otherf'), sorted('a', 'c'));
    assert.deepEqual(await matchIds('/Patient?family=zzyzx&given=bo'), sorted('b'));
  });

  test('token: system|code, |code, system|, bare code, :not, :of-type, :text, :missing', async () => {
    assert.deepEqual(await matchIds('/Patient?identifier=urn:test:mrn|MRN-SEARCH-A'), sorted('a'));
    assert.deepEqual(await matchIds('/Patient?identifier=MRN-SEARCH-B'), sorted('b'));
    assert.deepEqual(await matchIds('/Patient?identifier=|MRN-SEARCH-B'), []);
    assert.deepEqual(await matchIds('/Patient?identifier=urn:test:mrn|'), sorted('a', 'b'));
    assert.deepEqual(await matchIds('/Patient?gender=female'), sorted('a'));
    assert.deepEqual(await matchIds('/Patient?gender:not=female&family=zzyzx'), sorted('b'));
    assert.deepEqual(
      await matchIds(
        '/Patient?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|MRN-SEARCH-A',
      ),
      sorted('a'),
    );
    assert.deepEqual(await matchIds('/Observation?code:text=body'), sorted('height'));
    assert.deepEqual(
      await matchIds('/Observation?code=http://loinc.org|8302-2'),
      sorted('height', 'bHeight'),
    );
    assert.deepEqual(await matchIds('/Patient?birthdate:missing=true&family=zzyzx'), []);
    assert.deepEqual(await matchIds('/Patient?address:missing=true&family=zzyzx'), sorted('a', 'b'));
    assert.deepEqual(await matchIds('/Patient?birthdate:missing=false&family=zzyzx'), sorted('a', 'b'));
  });

  test('date: partial dates are ranges, each prefix is the R4 range comparison', async () => {
    // a: 1970-03-04 (a day); b: 1970 (a year)
    assert.deepEqual(await matchIds('/Patient?birthdate=1970'), sorted('a', 'b'));
    assert.deepEqual(await matchIds('/Patient?birthdate=1970-03'), sorted('a'));
    assert.deepEqual(await matchIds('/Patient?birthdate=ge1970-03&family=zzyzx'), sorted('a', 'b'));
    assert.deepEqual(await matchIds('/Patient?birthdate=lt1970-03'), sorted('b'));
    assert.deepEqual(await matchIds('/Patient?birthdate=gt1980'), sorted('c'));
    assert.deepEqual(await matchIds('/Patient?birthdate=sa1970'), sorted('c'));
    assert.deepEqual(await matchIds('/Patient?birthdate=eb1985&family=zzyzx'), sorted('a', 'b'));
    assert.deepEqual(await matchIds('/Patient?birthdate=ne1970-03-04&family=zzyzx'), sorted('b'));
  });

  test('date: time zones on both sides, and Periods', async () => {
    // 10:00 at -05:00 is 15:00Z
    assert.deepEqual(await matchIds('/Observation?date=2019-03-04T15:00:00Z'), sorted('height'));
    assert.deepEqual(await matchIds('/Observation?date=2019-03-04T16:00:00%2B01:00'), sorted('height'));
    assert.deepEqual(await matchIds('/Observation?date=2019-03-04T15:00:00%2B01:00'), []);
    assert.deepEqual(await matchIds('/Observation?date=2019-03-04'), sorted('height'));
    // The Period 2019-05-01..2019-06-15: within 2019, overlapping June (so not eq June), after March.
    assert.deepEqual(await matchIds('/Observation?date=2019&code=718-7'), sorted('hgb'));
    assert.deepEqual(await matchIds('/Observation?date=2019-06&code=718-7'), []);
    assert.deepEqual(await matchIds('/Observation?date=gt2019-05&code=718-7'), sorted('hgb'));
    assert.deepEqual(await matchIds('/Observation?date=ge2019-06&code=718-7'), []);
    assert.deepEqual(await matchIds('/Observation?date=sa2019-03&code=718-7'), sorted('hgb'));
  });

  test('quantity and composite', async () => {
    assert.deepEqual(
      await matchIds('/Observation?value-quantity=gt160|http://unitsofmeasure.org|cm'),
      sorted('height'),
    );
    assert.deepEqual(await matchIds('/Observation?value-quantity=13.5||g/dL'), sorted('hgb'));
    assert.deepEqual(
      await matchIds('/Observation?value-quantity=le150|http://unitsofmeasure.org|cm'),
      sorted('bHeight'),
    );
    assert.deepEqual(await matchIds('/Observation?value-quantity=le150'), sorted('hgb', 'bHeight'));
    assert.deepEqual(await matchIds('/Observation?value-quantity=13.5|http://unitsofmeasure.org|cm'), []);
    assert.deepEqual(
      await matchIds('/Observation?code-value-quantity=http://loinc.org|8302-2$gt160'),
      sorted('height'),
    );
    assert.deepEqual(await matchIds('/Observation?code-value-quantity=8302-2$lt160'), sorted('bHeight'));
  });

  test('reference: Type/id, bare id, type modifier, absolute URL', async () => {
    assert.deepEqual(await matchIds(`/Observation?subject=Patient/${ids.a}`), sorted('height', 'hgb'));
    assert.deepEqual(await matchIds(`/Observation?patient=${ids.b}`), sorted('bHeight'));
    assert.deepEqual(await matchIds(`/Observation?subject:Patient=${ids.b}`), sorted('bHeight'));
    assert.deepEqual(await matchIds(`/Observation?subject=${h.base}/Patient/${ids.b}`), sorted('bHeight'));
    assert.deepEqual(await matchIds(`/Observation?subject=Group/${ids.b}`), []);
  });

  test('reference :identifier, uri :below and :above, date ap', async () => {
    const logical = await create({
      resourceType: 'Observation',
      status: 'final',
      code: { coding: [{ system: LOINC, code: '29463-7' }] },
      subject: { identifier: { system: 'urn:test:mrn', value: 'MRN-LOGICAL-1' } },
      effectiveDateTime: '2001-06-15',
    });
    assert.deepEqual(await matchIds('/Observation?subject:identifier=urn:test:mrn|MRN-LOGICAL-1'), [logical]);
    assert.deepEqual(await matchIds('/Observation?subject:identifier=MRN-LOGICAL-1'), [logical]);
    assert.deepEqual(await matchIds('/Observation?subject:identifier=urn:other|MRN-LOGICAL-1'), []);
    assert.deepEqual(await matchIds('/Observation?date=ap2001-06-14&code=29463-7'), [logical]);
    assert.deepEqual(await matchIds('/Observation?date=ap1990-01-01&code=29463-7'), []);
    const vs = await create({
      resourceType: 'ValueSet',
      status: 'draft',
      url: 'http://example.org/fhir/ValueSet/test-search-vs',
    });
    assert.deepEqual(await matchIds('/ValueSet?url=http://example.org/fhir/ValueSet/test-search-vs'), [vs]);
    assert.deepEqual(await matchIds('/ValueSet?url:below=http://example.org/fhir'), [vs]);
    assert.deepEqual(await matchIds('/ValueSet?url:below=http://example.org/other'), []);
    assert.deepEqual(
      await matchIds('/ValueSet?url:above=http://example.org/fhir/ValueSet/test-search-vs/extra/path'),
      [vs],
    );
    assert.deepEqual(await matchIds('/ValueSet?url=http://example.org/fhir'), []);
  });

  test('_id and _lastUpdated', async () => {
    assert.deepEqual(await matchIds(`/Patient?_id=${ids.a},${ids.c}`), sorted('a', 'c'));
    assert.deepEqual(await matchIds(`/Patient?_lastUpdated=gt2000-01-01&family=zzyzx`), sorted('a', 'b'));
    assert.deepEqual(await matchIds(`/Patient?_lastUpdated=lt2000-01-01`), []);
  });
});

describe('chaining, reverse chaining, includes', () => {
  test('chained parameters', async () => {
    assert.deepEqual(await matchIds('/Observation?subject:Patient.name=zzyzxa'), sorted('height', 'hgb'));
    assert.deepEqual(await matchIds('/Observation?patient.gender=male'), sorted('bHeight'));
  });

  test('_has', async () => {
    assert.deepEqual(await matchIds('/Patient?_has:Observation:patient:code=718-7'), sorted('a'));
    assert.deepEqual(await matchIds('/Patient?_has:Observation:patient:code=8302-2'), sorted('a', 'b'));
  });

  test('_include and _revinclude (Provenance:target), marked include', async () => {
    const b = await search(
      '/Observation?code=718-7&_include=Observation:patient&_revinclude=Provenance:target',
    );
    const modes = b.entry.map((e) => `${e.search.mode}:${e.resource.resourceType}`).sort();
    assert.deepEqual(modes, ['include:Patient', 'include:Provenance', 'match:Observation']);
    const prov = b.entry.find((e) => e.resource.resourceType === 'Provenance')!;
    assert.match(prov.resource.target[0].reference, new RegExp(`^Observation/${ids.hgb}/_history/1$`));
    for (const e of b.entry) assert.equal(e.fullUrl, `${h.base}/${e.resource.resourceType}/${e.resource.id}`);
    // :iterate follows includes of included resources.
    const it = await search(
      `/Provenance?target=Observation/${ids.hgb}&_include=Provenance:target&_include:iterate=Observation:patient`,
    );
    assert.deepEqual(it.entry.map((e) => `${e.search.mode}:${e.resource.resourceType}`).sort(), [
      'include:Observation',
      'include:Patient',
      'match:Provenance',
    ]);
  });

  test('compartment search and system search', async () => {
    assert.deepEqual(await matchIds(`/Patient/${ids.a}/Observation`), sorted('height', 'hgb'));
    assert.deepEqual(await matchIds(`/Patient/${ids.a}/Observation?code=718-7`), sorted('hgb'));
    assert.deepEqual(
      await matchIds(`?_type=Patient,Observation&_id=${ids.a},${ids.hgb}`),
      sorted('a', 'hgb'),
    );
  });

  test('POST _search with a form body', async () => {
    const res = await h.fhir('/Patient/_search', {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: 'family=zzyzx&gender=male',
    });
    assert.equal(res.status, 200);
    const b = (await res.json()) as Bundle;
    assert.deepEqual(
      b.entry.map((e) => e.resource.id),
      [ids.b],
    );
  });
});

describe('paging, sorting, totals, summaries', () => {
  test('_sort with several keys and descending', async () => {
    // Dates are ranges: ascending sorts by their start, descending by their end (b is all of 1970).
    assert.deepEqual(await matchIds('/Patient?family=zzyzx,otherf&_sort=-birthdate', true), [
      ids.c,
      ids.b,
      ids.a,
    ]);
    assert.deepEqual(await matchIds('/Patient?family=zzyzx,otherf&_sort=birthdate', true), [
      ids.b,
      ids.a,
      ids.c,
    ]);
    assert.deepEqual(await matchIds('/Patient?family=zzyzx,otherf&_sort=family', true), [
      ids.c,
      ids.a,
      ids.b,
    ]);
    assert.deepEqual(await matchIds('/Patient?family=zzyzx,otherf&_sort=gender,-family', true), [
      ids.a,
      ids.b,
      ids.c,
    ]);
  });

  test('next and previous links walk the result with a cursor, and stay right while data changes', async () => {
    const first = await search('/Patient?family=zzyzx,otherf&_sort=family&_count=1');
    assert.equal(first.entry.length, 1);
    assert.equal(first.entry[0]!.resource.id, ids.c);
    assert.ok(!first.link.some((l) => l.relation === 'previous'));
    const nextUrl = first.link.find((l) => l.relation === 'next')!.url;
    // A resource inserted before the cursor position does not shift the next page.
    const early = await create(testPatient({ name: [{ family: 'Aaazzyzx' }] }));
    const second = await search(nextUrl.slice(h.base.length));
    assert.equal(second.entry[0]!.resource.id, ids.a);
    const third = await search(second.link.find((l) => l.relation === 'next')!.url.slice(h.base.length));
    assert.equal(third.entry[0]!.resource.id, ids.b);
    assert.ok(!third.link.some((l) => l.relation === 'next'));
    const back = await search(third.link.find((l) => l.relation === 'previous')!.url.slice(h.base.length));
    assert.equal(back.entry[0]!.resource.id, ids.a);
    await h.fhir(`/Patient/${early}`, { method: 'DELETE' });
  });

  test('a real client pages through a larger result with next links', async () => {
    const { Client } = await import('fhir-kit-client');
    const client = new Client({
      baseUrl: h.base,
      customHeaders: { authorization: `Bearer ${await h.token()}`, 'x-purpose-of-use': 'TREAT' },
    });
    const bundle = {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: Array.from({ length: 45 }, (_, i) => ({
        request: { method: 'POST', url: 'Patient' },
        resource: testPatient({
          name: [{ family: `Pagingtest`, given: [`Zz${String(i).padStart(2, '0')}`] }],
        }),
      })),
    };
    await client.transaction({ body: bundle });
    let page: any = await client.search({
      resourceType: 'Patient',
      searchParams: { family: 'pagingtest', _count: 10, _sort: 'given' },
    });
    const seen: string[] = [];
    for (;;) {
      seen.push(...page.entry.map((e: any) => e.resource.name[0].given[0]));
      const next = page.link.find((l: any) => l.relation === 'next');
      if (!next) break;
      page = await client.nextPage({ bundle: page });
    }
    assert.equal(seen.length, 45);
    assert.deepEqual(seen, [...seen].sort());
    assert.equal(new Set(seen).size, 45);
  });

  test('_total, _summary=count, _elements, _summary=true', async () => {
    const acc = await search('/Patient?family=zzyzx&_total=accurate&_count=1');
    assert.equal(acc.total, 2);
    assert.equal(acc.entry.length, 1);
    const est = await search('/Patient?family=zzyzx&_total=estimate&_count=1');
    assert.equal(typeof est.total, 'number');
    const none = await search('/Patient?family=zzyzx&_total=none&_count=1');
    assert.equal(none.total, undefined);
    const count = await search('/Patient?family=zzyzx&_summary=count');
    assert.equal(count.total, 2);
    assert.equal(count.entry.length, 0);
    const el = await search(`/Patient?_id=${ids.a}&_elements=gender`);
    const r = el.entry[0]!.resource;
    assert.equal(r.gender, 'female');
    assert.equal(r.name, undefined);
    assert.ok(r.meta.tag.some((t: any) => t.code === 'SUBSETTED'));
    const sum = await search(`/Observation?_id=${ids.hgb}&_summary=true`);
    const o = sum.entry[0]!.resource;
    assert.equal(o.code.coding[0].code, '718-7', 'code is a summary element');
    assert.equal(o.category, undefined, 'Observation.category is not a summary element in R4');
    const data = await search(`/Patient?_id=${ids.a}&_summary=data`);
    assert.equal(data.entry[0]!.resource.gender, 'female');
  });

  test('_security, _tag and _profile are searchable', async () => {
    const HT = 'http://terminology.hl7.org/CodeSystem/v3-ActReason|HTEST';
    assert.deepEqual(
      await matchIds(`/Patient?_security=${encodeURIComponent(HT)}&family=zzyzx`),
      sorted('a', 'b'),
    );
    assert.deepEqual(await matchIds(`/Patient?_security:not=${encodeURIComponent(HT)}`), []);
    const tagged = await create(
      testPatient({
        meta: {
          security: [HTEST],
          tag: [{ system: 'urn:test:tag', code: 'tagged' }],
          profile: ['http://example.org/StructureDefinition/test-profile'],
        },
      }),
    );
    assert.deepEqual(await matchIds('/Patient?_tag=urn:test:tag|tagged'), [tagged]);
    assert.deepEqual(
      await matchIds('/Patient?_profile=http://example.org/StructureDefinition/test-profile'),
      [tagged],
    );
    await h.fhir(`/Patient/${tagged}`, { method: 'DELETE' });
    assert.deepEqual(
      await matchIds('/Patient?_tag=urn:test:tag|tagged'),
      [],
      'a deleted resource is not found',
    );
  });
});

describe('bad input and strict handling', () => {
  test('unknown parameters: reported in an OperationOutcome entry, or a 400 naming them when strict', async () => {
    const b = await search('/Patient?family=zzyzxa&nosuchparam=1');
    assert.deepEqual(
      b.entry.filter((e) => e.search.mode === 'match').map((e) => e.resource.id),
      [ids.a],
    );
    const oo = b.entry.find((e) => e.search.mode === 'outcome')!.resource;
    assert.match(JSON.stringify(oo), /nosuchparam/);
    const strict = await h.fhir('/Patient?family=zzyzxa&nosuchparam=1', {
      headers: { prefer: 'handling=strict' },
    });
    assert.equal(strict.status, 400);
    assert.match(await strict.text(), /nosuchparam/);
  });

  test('malformed values are a precise 400, never a 500, and never echo the value', async () => {
    for (const [q, pattern] of [
      ['/Patient?birthdate=1970-13', /birthdate/],
      ['/Patient?birthdate=xx1970', /birthdate/],
      ['/Patient?_count=abc', /_count/],
      ['/Patient?_sort=nonsense', /nonsense/],
      ['/Observation?value-quantity=gt1.5.5', /value-quantity/],
      ['/Observation?subject.name.family=x', /more than one level/],
      ['/Patient?_cursor=bm90IGEgY3Vyc29y', /_cursor/],
    ] as const) {
      const res = await h.fhir(q);
      const text = await res.text();
      assert.equal(res.status, 400, `${q}: ${text}`);
      assert.match(text, /OperationOutcome/);
      assert.match(text, pattern, q);
    }
    const secret = '1970-99-SECRETVALUE';
    const res = await h.fhir(`/Patient?birthdate=${secret}`);
    assert.equal(res.status, 400);
    assert.ok(!(await res.text()).includes('SECRETVALUE'));
  });

  test('SQL metacharacters and Unicode are just values', async () => {
    for (const v of ["'; DROP TABLE resource; --", '%', '_', '\\', 'Zoë 🩺', "O'Brien"]) {
      const b = await search(`/Patient?family=${encodeURIComponent(v)}`);
      assert.equal(b.entry.filter((e) => e.search.mode === 'match').length, 0, v);
    }
    assert.deepEqual(await matchIds('/Patient?family=zzyzx'), sorted('a', 'b'));
  });

  test('_count above the limit is capped with a warning', async () => {
    const b = await search('/Patient?family=zzyzx&_count=100000');
    assert.match(JSON.stringify(b.entry.find((e) => e.search.mode === 'outcome')), /limited to 1000/);
  });
});

describe('access and audit', () => {
  test('a search is audited once, naming the patients returned, not the query', async () => {
    const before = await h.server.core.audit.size();
    await search(`/Observation?code=718-7&family=secretquerytext&_include=Observation:patient`).catch(
      () => undefined,
    );
    await search(`/Observation?code=718-7&_include=Observation:patient`);
    const rows = await h.server.core.audit.read(before, 100);
    const events = rows.map((r) => JSON.parse(r.entry.toString('utf8')));
    const ok = events.filter((e) => e.action === 'search' && e.outcome === 'success');
    assert.equal(ok.length, 2);
    assert.deepEqual(ok[1].patients, [ids.a]);
    assert.ok(!rows.some((r) => r.entry.toString('utf8').includes('secretquerytext')));
  });

  test('scopes bound search and includes: no type outside the token', async () => {
    const token = await h.token('system/Observation.rs');
    const forbidden = await h.fhir('/Patient?family=zzyzx', { token });
    assert.equal(forbidden.status, 403);
    const res = await h.fhir(`/Observation?code=718-7&_include=Observation:patient`, { token });
    assert.equal(res.status, 200);
    const b = (await res.json()) as Bundle;
    assert.ok(
      !b.entry.some((e) => e.resource.resourceType === 'Patient'),
      'the Patient must not be included',
    );
    // A chain through a type the token cannot read matches nothing rather than revealing it.
    assert.equal(
      (
        (await (await h.fhir('/Observation?subject:Patient.name=zzyzxa', { token })).json()) as Bundle
      ).entry.filter((e) => e.search.mode === 'match').length,
      0,
    );
    const sys = await h.fhir('?_type=Patient', { token });
    assert.equal(sys.status, 403);
  });
});
