import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startHarness, testPatient, HTEST, type Harness } from './support/harness.ts';

/*
 * Hostile and malformed input. Each request must get the right status and an OperationOutcome whose
 * first issue names our catalog code (system urn:custos:error); the server must stay up; and nothing
 * already stored may change: after every bad request the reference patient still reads back
 * byte-identical at version 1, and no resource version was written anywhere.
 */

let h: Harness;
let patientId: string;
let stored: { body: string; etag: string | null; lastModified: string | null };
let versionCount: number;
const prototypeKeys = Object.getOwnPropertyNames(Object.prototype).sort();

interface Outcome {
  resourceType: string;
  issue: {
    severity: string;
    code: string;
    details?: { coding?: { system?: string; code?: string }[]; text?: string };
    expression?: string[];
    diagnostics?: string;
  }[];
}

async function countVersions(): Promise<number> {
  const r = await h.server.core.resourceDb.query<{ n: number | string }>(
    'SELECT count(*) AS n FROM resource_version',
  );
  return Number(r.rows[0]!.n);
}

async function readReference(): Promise<typeof stored> {
  const res = await h.fhir(`/Patient/${patientId}`);
  assert.equal(res.status, 200, 'the server still answers');
  return {
    body: await res.text(),
    etag: res.headers.get('etag'),
    lastModified: res.headers.get('last-modified'),
  };
}

/**
 * Asserts the status, the OperationOutcome and its catalog code (and issue type when given), then
 * that nothing stored changed and the server still answers. Returns the outcome for further checks.
 */
async function rejected(res: Response, status: number, code: string, issueCode?: string): Promise<Outcome> {
  const text = await res.text();
  assert.equal(res.status, status, `status (body: ${text.slice(0, 300)})`);
  assert.match(res.headers.get('content-type') ?? '', /^application\/fhir\+json/);
  const oo = JSON.parse(text) as Outcome;
  assert.equal(oo.resourceType, 'OperationOutcome');
  assert.ok(oo.issue.length >= 1);
  const coding = oo.issue[0]!.details?.coding?.[0];
  assert.equal(coding?.system, 'urn:custos:error');
  assert.equal(coding?.code, code);
  if (issueCode !== undefined) assert.equal(oo.issue[0]!.code, issueCode);
  assert.equal(oo.issue[0]!.severity, 'error');
  await unchanged();
  return oo;
}

async function unchanged(): Promise<void> {
  assert.deepEqual(await readReference(), stored, 'the stored patient is unchanged');
  assert.equal(await countVersions(), versionCount, 'no resource version was written');
  assert.deepEqual(
    Object.getOwnPropertyNames(Object.prototype).sort(),
    prototypeKeys,
    'Object.prototype is unchanged',
  );
  assert.equal(({} as Record<string, unknown>).polluted, undefined, 'Object.prototype is not polluted');
}

const post = (path: string, body: string, headers: Record<string, string> = {}) =>
  h.fhir(path, { method: 'POST', body, headers });
const put = (path: string, body: string, headers: Record<string, string> = {}) =>
  h.fhir(path, { method: 'PUT', body, headers });
const patch = (body: string, headers: Record<string, string> = {}) =>
  h.fhir(`/Patient/${patientId}`, {
    method: 'PATCH',
    body,
    headers: { 'content-type': 'application/json-patch+json', ...headers },
  });
const bundle = (type: unknown, entry: unknown) => JSON.stringify({ resourceType: 'Bundle', type, entry });
const current = () => JSON.parse(stored.body) as Record<string, unknown>;

before(async () => {
  h = await startHarness();
  const res = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
  assert.equal(res.status, 201);
  patientId = ((await res.json()) as { id: string }).id;
  stored = await readReference();
  assert.equal(stored.etag, 'W/"1"');
  versionCount = await countVersions();
});
after(async () => {
  await h?.close();
});

describe('malformed bodies', () => {
  test('malformed JSON: 400 INVALID_JSON (create and update)', async () => {
    await rejected(await post('/Patient', '{"resourceType": "Patient",'), 400, 'INVALID_JSON', 'structure');
    await rejected(
      await put(`/Patient/${patientId}`, `{"resourceType":"Patient","id":"${patientId}"} trailing`),
      400,
      'INVALID_JSON',
    );
    await rejected(await post('/Patient', "{'single': 'quotes'}"), 400, 'INVALID_JSON');
    await rejected(await post('/Patient', ''), 400, 'INVALID_JSON');
  });

  test('a body that is JSON but not an object: 400 BAD_REQUEST', async () => {
    await rejected(await post('/Patient', 'null'), 400, 'BAD_REQUEST');
    await rejected(await post('/Patient', '[{"resourceType":"Patient"}]'), 400, 'BAD_REQUEST');
    await rejected(await post('/Patient', '"Patient"'), 400, 'BAD_REQUEST');
  });

  test('wrong content type: 415 UNSUPPORTED_MEDIA_TYPE', async () => {
    const body = JSON.stringify(testPatient());
    await rejected(
      await post('/Patient', body, { 'content-type': 'text/plain' }),
      415,
      'UNSUPPORTED_MEDIA_TYPE',
      'not-supported',
    );
    await rejected(
      await post('/Patient', '<Patient xmlns="http://hl7.org/fhir"/>', { 'content-type': 'application/xml' }),
      415,
      'UNSUPPORTED_MEDIA_TYPE',
    );
    await rejected(
      await post('/Patient', '<Patient/>', { 'content-type': 'application/fhir+xml' }),
      415,
      'UNSUPPORTED_MEDIA_TYPE',
    );
    await rejected(
      await put(`/Patient/${patientId}`, body, { 'content-type': 'application/x-www-form-urlencoded' }),
      415,
      'UNSUPPORTED_MEDIA_TYPE',
    );
    // No Content-Type at all.
    const token = await h.token();
    const bare = await fetch(`${h.base}/Patient`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'x-purpose-of-use': 'TREAT' },
      body: new TextEncoder().encode(body),
    });
    await rejected(bare, 415, 'UNSUPPORTED_MEDIA_TYPE');
  });

  test('a body of 50 MB: 413 BODY_TOO_LARGE, with and without Content-Length; the server stays up', async () => {
    const big = `{"resourceType":"Patient","text":"${'a'.repeat(50 * 1024 * 1024)}"}`;
    await rejected(await post('/Patient', big), 413, 'BODY_TOO_LARGE', 'too-costly');
    await rejected(await put(`/Patient/${patientId}`, big), 413, 'BODY_TOO_LARGE');
    const chunk = new TextEncoder().encode('a'.repeat(1024 * 1024));
    const stream = new ReadableStream<Uint8Array>({
      start(c) {
        for (let i = 0; i < 50; i++) c.enqueue(chunk);
        c.close();
      },
    });
    // Chunked: the limit is enforced while reading, not only from Content-Length.
    const chunked = await h.fhir('/Patient', { method: 'POST', body: stream, duplex: 'half' } as RequestInit);
    await rejected(chunked, 413, 'BODY_TOO_LARGE');
  });

  test('JSON nested 10,000 deep: 400 JSON_TOO_DEEP (too-costly), arrays and objects', async () => {
    const n = 10_000;
    await rejected(
      await post('/Patient', `${'['.repeat(n)}${']'.repeat(n)}`),
      400,
      'JSON_TOO_DEEP',
      'too-costly',
    );
    await rejected(
      await post('/Patient', `${'{"a":'.repeat(n)}1${'}'.repeat(n)}`),
      400,
      'JSON_TOO_DEEP',
      'too-costly',
    );
    const deepExtension = `{"resourceType":"Patient","extension":${'[{"url":"http://example.org","extension":'.repeat(n)}[]${'}]'.repeat(n)}}`;
    await rejected(await post('/Patient', deepExtension), 400, 'JSON_TOO_DEEP');
    await rejected(
      await post(
        '/',
        `{"resourceType":"Bundle","type":"transaction","entry":${'['.repeat(n)}${']'.repeat(n)}}`,
      ),
      400,
      'JSON_TOO_DEEP',
    );
    await rejected(await patch(`[${'{"a":'.repeat(n)}1${'}'.repeat(n)}]`), 400, 'JSON_TOO_DEEP');
  });

  test('brackets inside strings do not count as depth', async () => {
    const res = await post(
      '/Patient',
      JSON.stringify(testPatient({ name: [{ family: `${'['.repeat(200)}\\"{{{`, given: ['x'] }] })),
    );
    assert.equal(res.status, 201);
    // A legitimate write moves the counter `unchanged()` watches (so it would see a bad request's write).
    const after = await countVersions();
    assert.ok(after > versionCount);
    versionCount = after;
    await unchanged();
  });

  test('__proto__ and constructor.prototype keys: 400, and Object.prototype is not polluted', async () => {
    const base = { resourceType: 'Patient', meta: { security: [HTEST] } };
    const proto = `{"resourceType":"Patient","meta":{"security":[{"system":"${HTEST.system}","code":"HTEST"}]},"__proto__":{"polluted":"yes"}}`;
    await rejected(await post('/Patient', proto), 400, 'INVALID_JSON');
    await rejected(
      await post(
        '/Patient',
        JSON.stringify({ ...base, name: [{ family: 'x' }] }).replace(
          '"name"',
          '"__proto__":{"polluted":1},"name"',
        ),
      ),
      400,
      'INVALID_JSON',
    );
    const ctor = JSON.stringify({ ...base, constructor: { prototype: { polluted: 'yes' } } });
    await rejected(await post('/Patient', ctor), 400, 'INVALID_JSON');
    await rejected(
      await put(
        `/Patient/${patientId}`,
        proto.replace('"resourceType":"Patient"', `"resourceType":"Patient","id":"${patientId}"`),
      ),
      400,
      'INVALID_JSON',
    );
    await rejected(
      await patch(`[{"op":"add","path":"/x","value":{"__proto__":{"polluted":true}}}]`),
      400,
      'INVALID_JSON',
    );
    await rejected(
      await post('/', `{"resourceType":"Bundle","type":"batch","entry":[{"__proto__":{"polluted":1}}]}`),
      400,
      'INVALID_JSON',
    );
    // The key nested deep inside a valid resource, and escaped (\u005f is "_").
    await rejected(
      await post('/Patient', `{"resourceType":"Patient","name":[{"\\u005f_proto__":{"polluted":1}}]}`),
      400,
      'INVALID_JSON',
    );
    // JSON Patch paths that walk into the prototype.
    await rejected(
      await patch(JSON.stringify([{ op: 'add', path: '/__proto__/polluted', value: 'yes' }])),
      422,
      'INVALID_PATCH',
    );
    await rejected(
      await patch(JSON.stringify([{ op: 'add', path: '/constructor/prototype/polluted', value: 'yes' }])),
      422,
      'INVALID_PATCH',
    );
    await rejected(
      await patch(JSON.stringify([{ op: 'replace', path: '/name/0/__proto__', value: { polluted: 'yes' } }])),
      422,
      'INVALID_PATCH',
    );
  });
});

describe('URLs and headers', () => {
  test('a resource type that does not exist: 404 UNKNOWN_RESOURCE_TYPE (not-supported)', async () => {
    await rejected(await h.fhir('/Foo'), 404, 'UNKNOWN_RESOURCE_TYPE', 'not-supported');
    await rejected(
      await post('/Foo', JSON.stringify({ resourceType: 'Foo' })),
      404,
      'UNKNOWN_RESOURCE_TYPE',
      'not-supported',
    );
    await rejected(await h.fhir('/Foo/1'), 404, 'UNKNOWN_RESOURCE_TYPE');
    await rejected(
      await put('/Foo/1', JSON.stringify({ resourceType: 'Foo', id: '1' })),
      404,
      'UNKNOWN_RESOURCE_TYPE',
    );
    await rejected(await h.fhir('/Foo/1', { method: 'DELETE' }), 404, 'UNKNOWN_RESOURCE_TYPE');
    await rejected(await h.fhir('/Foo/_history'), 404, 'UNKNOWN_RESOURCE_TYPE');
    await rejected(await h.fhir('/patient/1'), 404, 'UNKNOWN_RESOURCE_TYPE', 'not-supported');
    await rejected(await h.fhir('/SubscriptionStatus/1'), 404, 'UNKNOWN_RESOURCE_TYPE'); // R4B, not R4
  });

  test('an invalid id: 400 INVALID_ID', async () => {
    await rejected(await h.fhir('/Patient/bad$id'), 400, 'INVALID_ID', 'value');
    await rejected(await h.fhir('/Patient/bad%20id'), 400, 'INVALID_ID');
    await rejected(await h.fhir('/Patient/bad_id'), 400, 'INVALID_ID');
    await rejected(await h.fhir(`/Patient/${'a'.repeat(65)}`), 400, 'INVALID_ID');
    await rejected(
      await put('/Patient/bad$id', JSON.stringify(testPatient({ id: 'bad$id' }))),
      400,
      'INVALID_ID',
    );
    await rejected(
      await h.fhir('/Patient/bad$id', {
        method: 'PATCH',
        body: '[]',
        headers: { 'content-type': 'application/json-patch+json' },
      }),
      400,
      'INVALID_ID',
    );
    await rejected(await h.fhir('/Patient/bad$id', { method: 'DELETE' }), 400, 'INVALID_ID');
    await rejected(await h.fhir('/Patient/bad$id/_history/1'), 400, 'INVALID_ID');
  });

  test('over-long and malformed path segments: 400 BAD_REQUEST, not the framework default', async () => {
    await rejected(await h.fhir(`/Patient/${'a'.repeat(300)}`), 400, 'BAD_REQUEST');
    await rejected(await h.fhir('/Patient/abc%ZZ'), 400, 'BAD_REQUEST');
    await rejected(await h.fhir('/Patient/%E0%A4%A'), 400, 'BAD_REQUEST');
  });

  test('an unknown endpoint: 404 ROUTE_NOT_FOUND', async () => {
    await rejected(await h.fhir('/Patient/1/_history/1/extra'), 404, 'ROUTE_NOT_FOUND');
    await rejected(await fetch(`${h.server.url}/no/such/thing`), 404, 'ROUTE_NOT_FOUND');
  });

  test('id in the body differs from the id in the URL on PUT: 400 ID_MISMATCH', async () => {
    await rejected(
      await put(`/Patient/${patientId}`, JSON.stringify({ ...current(), id: 'other-id' })),
      400,
      'ID_MISMATCH',
      'invalid',
    );
    // Update needs the id in the body (https://hl7.org/fhir/R4/http.html#update).
    const noId = current();
    delete noId.id;
    await rejected(await put(`/Patient/${patientId}`, JSON.stringify(noId)), 400, 'ID_MISMATCH');
    await rejected(
      await put(`/Patient/${patientId}`, JSON.stringify({ ...current(), resourceType: 'Observation' })),
      400,
      'TYPE_MISMATCH',
    );
  });

  test('a stale If-Match: 412 VERSION_CONFLICT', async () => {
    const body = JSON.stringify({ ...current(), gender: 'female' });
    await rejected(
      await put(`/Patient/${patientId}`, body, { 'if-match': 'W/"0"' }),
      412,
      'VERSION_CONFLICT',
      'conflict',
    );
    await rejected(
      await put(`/Patient/${patientId}`, body, { 'if-match': 'W/"2"' }),
      412,
      'VERSION_CONFLICT',
    );
    await rejected(
      await patch(JSON.stringify([{ op: 'replace', path: '/gender', value: 'female' }]), {
        'if-match': 'W/"7"',
      }),
      412,
      'VERSION_CONFLICT',
    );
  });

  test('an invalid If-Match: 412 VERSION_CONFLICT (it cannot match any version)', async () => {
    const body = JSON.stringify({ ...current(), gender: 'female' });
    for (const ifMatch of ['1', 'W/1', '"abc"', 'W/"1', '*', 'W/"1", W/"2"', `W/"${'9'.repeat(12)}"`]) {
      await rejected(
        await put(`/Patient/${patientId}`, body, { 'if-match': ifMatch }),
        412,
        'VERSION_CONFLICT',
      );
    }
    await rejected(
      await patch(JSON.stringify([{ op: 'replace', path: '/gender', value: 'female' }]), {
        'if-match': 'garbage',
      }),
      412,
      'VERSION_CONFLICT',
    );
  });

  test('history parameters: bad _count, _since, _cursor give 400 BAD_REQUEST', async () => {
    for (const q of [
      '_count=0',
      '_count=-1',
      '_count=abc',
      '_count=1.5',
      '_since=yesterday',
      '_since=2020-01-01%20(x)',
      '_since=2020-01-01T10:00:00',
      '_cursor=not-a-cursor',
    ]) {
      await rejected(await h.fhir(`/Patient/_history?${q}`), 400, 'BAD_REQUEST');
    }
    // A well-formed _since still works, including a zone whose "+" arrived as a space.
    for (const since of [
      '2000',
      '2000-01-01',
      '2000-01-01T00:00:00Z',
      '2000-01-01T00:00:00%2B01:00',
      '2000-01-01T00:00:00+01:00',
    ]) {
      const ok = await h.fhir(`/Patient/${patientId}/_history?_since=${since}`);
      assert.equal(ok.status, 200, since);
      assert.equal(((await ok.json()) as { entry: unknown[] }).entry.length, 1, since);
    }
  });

  test('a decodable _cursor holding values of the wrong shape: 400 BAD_REQUEST', async () => {
    const cursor = Buffer.from(JSON.stringify(['not a time', 'Patient', 'x', 1])).toString('base64url');
    await rejected(await h.fhir(`/_history?_cursor=${cursor}`), 400, 'BAD_REQUEST');
    const cursor2 = Buffer.from(JSON.stringify({ a: 1 })).toString('base64url');
    await rejected(await h.fhir(`/_history?_cursor=${cursor2}`), 400, 'BAD_REQUEST');
  });
});

describe('bundles', () => {
  test('a Bundle POSTed to the base whose type is neither batch nor transaction: 400 INVALID_BUNDLE', async () => {
    for (const type of [
      'collection',
      'document',
      'searchset',
      'batch-response',
      'transaction-response',
      'history',
      'message',
      undefined,
      7,
    ]) {
      await rejected(
        await post(
          '/',
          bundle(type, [{ resource: testPatient(), request: { method: 'POST', url: 'Patient' } }]),
        ),
        400,
        'INVALID_BUNDLE',
        'invalid',
      );
    }
    await rejected(
      await post('/', JSON.stringify({ ...testPatient(), type: 'transaction' })),
      400,
      'INVALID_BUNDLE',
    );
    await rejected(await post('/', '[]'), 400, 'INVALID_BUNDLE');
  });

  test('a transaction whose entries are not objects: 400 INVALID_BUNDLE, nothing committed', async () => {
    const good = { resource: testPatient(), request: { method: 'POST', url: 'Patient' } };
    for (const entry of [[good, 1], [good, 'x'], [good, null], [good, []], 'entries', { 0: good }]) {
      await rejected(await post('/', bundle('transaction', entry)), 400, 'INVALID_BUNDLE');
    }
    await rejected(await post('/', bundle('batch', [good, null])), 400, 'INVALID_BUNDLE');
  });

  test('transaction entries without a usable request: 400 INVALID_BUNDLE, nothing committed', async () => {
    const good = { resource: testPatient(), request: { method: 'POST', url: 'Patient' } };
    for (const bad of [
      { resource: testPatient() },
      { request: { method: 'POST' } },
      { request: { method: 7, url: 'Patient' } },
      { request: { method: 'TRACE', url: 'Patient' } },
    ]) {
      await rejected(await post('/', bundle('transaction', [good, bad])), 400, 'INVALID_BUNDLE');
    }
    const dup = `urn:uuid:${crypto.randomUUID()}`;
    await rejected(
      await post(
        '/',
        bundle('transaction', [
          { ...good, fullUrl: dup },
          { ...good, fullUrl: dup },
        ]),
      ),
      400,
      'INVALID_BUNDLE',
    );
  });

  test('a transaction with one invalid resource commits nothing: 400 VALIDATION_FAILED', async () => {
    const res = await post(
      '/',
      bundle('transaction', [
        { resource: testPatient(), request: { method: 'POST', url: 'Patient' } },
        {
          resource: { ...current(), gender: 'female' },
          request: { method: 'PUT', url: `Patient/${patientId}` },
        },
        { resource: testPatient({ active: 'yes' }), request: { method: 'POST', url: 'Patient' } },
      ]),
    );
    const oo = await rejected(res, 400, 'VALIDATION_FAILED');
    assert.deepEqual(oo.issue[0]!.expression, ['Patient.active']);
  });

  test('a batch reports failing entries one by one and commits none of them', async () => {
    const res = await post(
      '/',
      bundle('batch', [
        { resource: testPatient({ active: 'yes' }), request: { method: 'POST', url: 'Patient' } },
        { request: { method: 'GET', url: 'Foo/1' } },
        { request: { method: 'GET', url: 'Patient/bad$id' } },
        {
          resource: { ...current(), gender: 'female' },
          request: { method: 'PUT', url: `Patient/${patientId}`, ifMatch: 'W/"9"' },
        },
        { request: { method: 'FROB', url: 'Patient' } },
      ]),
    );
    assert.equal(res.status, 200);
    const out = (await res.json()) as {
      type: string;
      entry: { response: { status: string; outcome: Outcome } }[];
    };
    assert.equal(out.type, 'batch-response');
    assert.deepEqual(
      out.entry.map((e) => [e.response.status, e.response.outcome.issue[0]!.details!.coding![0]!.code]),
      [
        ['400', 'VALIDATION_FAILED'],
        ['404', 'UNKNOWN_RESOURCE_TYPE'],
        ['400', 'INVALID_ID'],
        ['412', 'VERSION_CONFLICT'],
        ['400', 'INVALID_BUNDLE'],
      ],
    );
    await unchanged();
  });
});

describe('JSON Patch', () => {
  test('not an array: 422 INVALID_PATCH', async () => {
    await rejected(
      await patch(JSON.stringify({ op: 'replace', path: '/gender', value: 'female' })),
      422,
      'INVALID_PATCH',
      'processing',
    );
    await rejected(await patch('"replace"'), 422, 'INVALID_PATCH');
    await rejected(await patch('null'), 422, 'INVALID_PATCH');
    // A FHIR resource sent as the patch document (wrong content type for PATCH here).
    await rejected(
      await patch(JSON.stringify(current()), { 'content-type': 'application/fhir+json' }),
      422,
      'INVALID_PATCH',
    );
  });

  test('an invalid operation: 422 INVALID_PATCH, and earlier operations are not applied', async () => {
    const ok = { op: 'replace', path: '/gender', value: 'female' };
    for (const bad of [
      { op: 'frobnicate', path: '/gender', value: 'x' },
      { op: 'replace', path: '/noSuchElement', value: 'x' },
      { op: 'remove', path: '/name/7' },
      { op: 'replace', path: 'gender', value: 'x' },
      { op: 'add', path: '/gender' },
      { op: 'test', path: '/gender', value: 'male' },
      { op: 'move', from: '/nowhere', path: '/gender' },
      'replace',
      null,
    ]) {
      await rejected(await patch(JSON.stringify([ok, bad])), 422, 'INVALID_PATCH');
    }
  });

  test('changing id or resourceType: 400 ID_MISMATCH / TYPE_MISMATCH', async () => {
    await rejected(
      await patch(JSON.stringify([{ op: 'replace', path: '/id', value: 'other-id' }])),
      400,
      'ID_MISMATCH',
    );
    await rejected(await patch(JSON.stringify([{ op: 'remove', path: '/id' }])), 400, 'ID_MISMATCH');
    await rejected(
      await patch(JSON.stringify([{ op: 'replace', path: '/resourceType', value: 'Observation' }])),
      400,
      'TYPE_MISMATCH',
    );
    await rejected(
      await patch(JSON.stringify([{ op: 'remove', path: '/resourceType' }])),
      400,
      'TYPE_MISMATCH',
    );
  });

  test('a patch that leaves an invalid resource: 400 VALIDATION_FAILED with expression', async () => {
    const oo = await rejected(
      await patch(JSON.stringify([{ op: 'replace', path: '/birthDate', value: 'not a date' }])),
      400,
      'VALIDATION_FAILED',
    );
    assert.deepEqual(oo.issue[0]!.expression, ['Patient.birthDate']);
    await rejected(
      await patch(JSON.stringify([{ op: 'remove', path: '/meta' }])),
      422,
      'SANDBOX_REQUIRES_TEST_LABEL',
    );
  });
});

describe('validation', () => {
  test('a value of the wrong type: 400 VALIDATION_FAILED with expression', async () => {
    const oo = await rejected(
      await post('/Patient', JSON.stringify(testPatient({ active: 'yes' }))),
      400,
      'VALIDATION_FAILED',
      'value',
    );
    assert.deepEqual(oo.issue[0]!.expression, ['Patient.active']);
    const oo2 = await rejected(
      await post('/Patient', JSON.stringify(testPatient({ birthDate: 19700101 }))),
      400,
      'VALIDATION_FAILED',
    );
    assert.deepEqual(oo2.issue[0]!.expression, ['Patient.birthDate']);
    const oo3 = await rejected(
      await post('/Patient', JSON.stringify(testPatient({ name: { family: 'x' } }))),
      400,
      'VALIDATION_FAILED',
    );
    assert.deepEqual(oo3.issue[0]!.expression, ['Patient.name']);
  });

  test('an unknown element: 400 VALIDATION_FAILED with expression', async () => {
    const oo = await rejected(
      await post('/Patient', JSON.stringify(testPatient({ foo: 1 }))),
      400,
      'VALIDATION_FAILED',
      'structure',
    );
    assert.deepEqual(oo.issue[0]!.expression, ['Patient.foo']);
    const oo2 = await rejected(
      await post('/Patient', JSON.stringify(testPatient({ name: [{ family: 'x', nickname: 'y' }] }))),
      400,
      'VALIDATION_FAILED',
    );
    assert.deepEqual(oo2.issue[0]!.expression, ['Patient.name[0].nickname']);
    const oo3 = await rejected(
      await put(`/Patient/${patientId}`, JSON.stringify({ ...current(), foo: 1 })),
      400,
      'VALIDATION_FAILED',
    );
    assert.deepEqual(oo3.issue[0]!.expression, ['Patient.foo']);
  });

  test('every issue of an invalid resource has an expression and our code', async () => {
    const oo = await rejected(
      await post('/Patient', JSON.stringify(testPatient({ active: 'yes', foo: 1, gender: 'robot' }))),
      400,
      'VALIDATION_FAILED',
    );
    assert.ok(oo.issue.length >= 3);
    for (const i of oo.issue) {
      assert.equal(i.details?.coding?.[0]?.code, 'VALIDATION_FAILED');
      assert.ok(i.expression?.[0]?.startsWith('Patient.'), JSON.stringify(i));
    }
  });

  test('unlabelled data in the sandbox: 422 SANDBOX_REQUIRES_TEST_LABEL, and the refusal is audited', async () => {
    const p = testPatient();
    delete p.meta;
    const audit = h.server.core.audit;
    const before = await audit.size();
    await rejected(
      await post('/Patient', JSON.stringify(p)),
      422,
      'SANDBOX_REQUIRES_TEST_LABEL',
      'business-rule',
    );
    const events = (await audit.read(before, (await audit.size()) - before)).map(
      (r) => JSON.parse(r.entry.toString('utf8')) as { code?: string; outcome?: string; action?: string },
    );
    assert.ok(
      events.some(
        (e) => e.code === 'SANDBOX_REQUIRES_TEST_LABEL' && e.outcome === 'refused' && e.action === 'create',
      ),
    );
  });
});

test('after all of it, the server still serves reads and writes', async () => {
  await unchanged();
  const res = await put(`/Patient/${patientId}`, JSON.stringify({ ...current(), gender: 'female' }), {
    'if-match': 'W/"1"',
  });
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('etag'), 'W/"2"');
  const health = await fetch(`${h.server.url}/healthz`);
  assert.equal(health.status, 200);
});
