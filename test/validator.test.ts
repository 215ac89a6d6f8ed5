import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { initValidator, validateResource } from '../src/fhir/validator.ts';
import { isResourceType, RESOURCE_TYPES } from '../src/fhir/resource-types.ts';
import type { IssueDetail } from '../src/kernel/errors.ts';

const syntheaDir = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'shared', 'data', 'synthea-r4');

initValidator();

const PATIENT_ID = '3f2a9c1e-0000-4000-8000-000000000001';

/** Obviously fake test data: 999- SSN, 555-01xx phone, Zzyzx names. */
function syntheticPatient(): Record<string, unknown> {
  return {
    resourceType: 'Patient',
    id: 'testpatient-1',
    meta: { versionId: '1', lastUpdated: '2024-01-02T03:04:05.678Z' },
    text: {
      status: 'generated',
      div: '<div xmlns="http://www.w3.org/1999/xhtml"><p>Testpatient <b>Zzyzx</b></p></div>',
    },
    extension: [
      {
        url: 'http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex',
        valueCode: 'F',
      },
      {
        url: 'http://hl7.org/fhir/us/core/StructureDefinition/us-core-race',
        extension: [
          { url: 'ombCategory', valueCoding: { system: 'urn:oid:2.16.840.1.113883.6.238', code: '2106-3' } },
          { url: 'text', valueString: 'Test' },
        ],
      },
    ],
    identifier: [
      {
        system: 'http://hl7.org/fhir/sid/us-ssn',
        value: '999-01-2345',
        type: { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/v2-0203', code: 'SS' }] },
      },
    ],
    active: true,
    name: [
      {
        use: 'official',
        family: 'Zzyzx',
        given: ['Testpatient', 'Middle'],
        _given: [
          null,
          { extension: [{ url: 'http://example.org/fhir/StructureDefinition/x', valueBoolean: true }] },
        ],
      },
    ],
    telecom: [{ system: 'phone', value: '555-0123', use: 'home' }],
    gender: 'female',
    birthDate: '1970-01-31',
    _birthDate: {
      extension: [
        {
          url: 'http://hl7.org/fhir/StructureDefinition/patient-birthTime',
          valueDateTime: '1970-01-31T08:15:00-05:00',
        },
      ],
    },
    address: [
      { line: ['1 Test Street'], city: 'Testville', state: 'ZZ', postalCode: '00000', country: 'US' },
    ],
    contained: [{ resourceType: 'Organization', id: 'org1', name: 'Test Clinic Zzyzx' }],
    managingOrganization: { reference: '#org1' },
    maritalStatus: {
      coding: [{ system: 'http://terminology.hl7.org/CodeSystem/v3-MaritalStatus', code: 'S' }],
    },
    multipleBirthBoolean: false,
  };
}

function syntheticObservation(): Record<string, unknown> {
  return {
    resourceType: 'Observation',
    id: 'obs-1',
    status: 'final',
    category: [
      {
        coding: [
          { system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'vital-signs' },
        ],
      },
    ],
    code: {
      coding: [{ system: 'http://loinc.org', code: '8867-4', display: 'Heart rate' }],
      text: 'Heart rate',
    },
    subject: { reference: 'Patient/testpatient-1' },
    effectiveDateTime: '2024-01-02T03:04:05Z',
    issued: '2024-01-02T03:04:05.123+01:00',
    valueQuantity: { value: 72, unit: '/min', system: 'http://unitsofmeasure.org', code: '/min' },
    referenceRange: [{ low: { value: 60, unit: '/min' }, high: { value: 100, unit: '/min' } }],
  };
}

function syntheticBundle(): Record<string, unknown> {
  const patient = syntheticPatient();
  delete patient['id'];
  return {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      { fullUrl: `urn:uuid:${PATIENT_ID}`, resource: patient, request: { method: 'POST', url: 'Patient' } },
      {
        fullUrl: 'urn:uuid:3f2a9c1e-0000-4000-8000-000000000002',
        resource: {
          resourceType: 'Encounter',
          status: 'finished',
          class: { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'AMB' },
          subject: { reference: `urn:uuid:${PATIENT_ID}` },
          period: { start: '2024-01-02T03:04:05Z', end: '2024-01-02T04:04:05Z' },
        },
        request: { method: 'POST', url: 'Encounter' },
      },
      {
        fullUrl: 'urn:uuid:3f2a9c1e-0000-4000-8000-000000000003',
        resource: {
          ...syntheticObservation(),
          id: undefined,
          subject: { reference: 'Patient?identifier=http://hl7.org/fhir/sid/us-ssn|999-01-2345' },
        },
        request: { method: 'PUT', url: 'Observation?identifier=http://example.org|obs-1' },
      },
    ],
  };
}

function expressions(issues: IssueDetail[]): (string | undefined)[] {
  return issues.map((i) => i.expression);
}

/** Drops `undefined` values as JSON would. */
function json(value: unknown): unknown {
  return JSON.parse(JSON.stringify(value));
}

test('R4 resource types come from the base spec: 146, none of Medplum', () => {
  assert.equal(RESOURCE_TYPES.size, 146);
  for (const t of [
    'Patient',
    'Observation',
    'Bundle',
    'Parameters',
    'OperationOutcome',
    'VisionPrescription',
  ]) {
    assert.ok(isResourceType(t), t);
  }
  for (const t of [
    'Project',
    'Bot',
    'UserConfiguration',
    'ProjectMembership',
    'SubscriptionStatus',
    'Resource',
    'DomainResource',
    'patient',
    '',
    42,
  ]) {
    assert.equal(isResourceType(t), false, String(t));
  }
});

test('small synthetic resources are valid', () => {
  assert.deepEqual(validateResource(syntheticPatient()), []);
  assert.deepEqual(validateResource(syntheticObservation()), []);
  assert.deepEqual(validateResource(json(syntheticBundle())), []);
  assert.deepEqual(validateResource({ resourceType: 'Patient' }), []);
  assert.deepEqual(
    validateResource({
      resourceType: 'Condition',
      clinicalStatus: {
        coding: [{ system: 'http://terminology.hl7.org/CodeSystem/condition-clinical', code: 'active' }],
      },
      code: { text: 'Test condition' },
      subject: { reference: 'https://fhir.example.org/r4/Patient/testpatient-1/_history/2' },
      onsetDateTime: '2020-02-29',
    }),
    [],
  );
});

test('Synthea bundles from shared data are valid, well under 1 ms per resource', (t) => {
  if (!existsSync(syntheaDir)) {
    t.skip(`shared Synthea data not found at ${syntheaDir}`);
    return;
  }
  const files = readdirSync(syntheaDir)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .slice(0, 3);
  const resources: unknown[] = [];
  for (const f of files) {
    const bundle = JSON.parse(readFileSync(join(syntheaDir, f), 'utf8')) as {
      entry: { resource: unknown }[];
    };
    assert.deepEqual(validateResource(bundle), [], f);
    for (const e of bundle.entry) resources.push(e.resource);
  }
  const start = performance.now();
  for (const r of resources) assert.deepEqual(validateResource(r), []);
  const perResource = (performance.now() - start) / resources.length;
  t.diagnostic(`${resources.length} Synthea resources, ${perResource.toFixed(3)} ms per resource`);
  assert.ok(perResource < 1, `${perResource} ms per resource`);
});

test('unknown element refused with its expression', () => {
  const issues = validateResource({ resourceType: 'Patient', foo: 1, name: [{ family: 'Zzyzx', bar: 'x' }] });
  assert.deepEqual(expressions(issues).sort(), ['Patient.foo', 'Patient.name[0].bar']);
  assert.ok(
    issues.every((i) => i.severity === 'error' && i.code === 'structure'),
    JSON.stringify(issues),
  );
  assert.match(issues[0]?.diagnostics ?? '', /Unknown element/);
});

test('Medplum-only additions are not R4: meta.project, Binary.url, Medplum resource types', () => {
  assert.deepEqual(expressions(validateResource({ resourceType: 'Patient', meta: { project: 'p1' } })), [
    'Patient.meta.project',
  ]);
  assert.deepEqual(
    expressions(
      validateResource({ resourceType: 'Patient', meta: { compartment: [{ reference: 'Patient/1' }] } }),
    ),
    ['Patient.meta.compartment'],
  );
  assert.deepEqual(
    expressions(
      validateResource({ resourceType: 'Binary', contentType: 'text/plain', url: 'https://example.org/b' }),
    ),
    ['Binary.url'],
  );
  for (const resourceType of ['Project', 'Bot', 'UserConfiguration', 'ClientApplication']) {
    const issues = validateResource({ resourceType, name: 'Test' });
    assert.equal(issues.length, 1, resourceType);
    assert.equal(issues[0]?.code, 'not-supported');
  }
});

test('wrong JSON type refused: birthDate 12', () => {
  const issues = validateResource({ resourceType: 'Patient', birthDate: 12 });
  assert.deepEqual(expressions(issues), ['Patient.birthDate']);
  assert.equal(issues[0]?.code, 'value');
  assert.deepEqual(expressions(validateResource({ resourceType: 'Patient', active: 'true' })), [
    'Patient.active',
  ]);
  assert.deepEqual(
    expressions(validateResource({ ...syntheticObservation(), valueQuantity: { value: '72' } })),
    ['Observation.valueQuantity.value'],
  );
});

test('primitive formats: id, date, dateTime, instant, uri, code, integers', () => {
  const cases: [Record<string, unknown>, string][] = [
    [{ resourceType: 'Patient', id: 'bad_id' }, 'Patient.id'],
    [{ resourceType: 'Patient', id: 'x'.repeat(65) }, 'Patient.id'],
    [{ resourceType: 'Patient', birthDate: '1970-13-01' }, 'Patient.birthDate'],
    [{ resourceType: 'Patient', birthDate: '2019-02-29' }, 'Patient.birthDate'],
    [{ resourceType: 'Patient', deceasedDateTime: '2020-01-01T10:00:00' }, 'Patient.deceasedDateTime'],
    [{ resourceType: 'Patient', meta: { lastUpdated: '2020-01-01' } }, 'Patient.meta.lastUpdated'],
    [{ resourceType: 'Patient', implicitRules: 'has space' }, 'Patient.implicitRules'],
    [{ resourceType: 'Patient', language: 'en  US' }, 'Patient.language'],
    [{ resourceType: 'Patient', multipleBirthInteger: 1.5 }, 'Patient.multipleBirthInteger'],
    [{ resourceType: 'Patient', name: [{ family: '' }] }, 'Patient.name[0].family'],
  ];
  for (const [resource, expression] of cases) {
    assert.deepEqual(expressions(validateResource(resource)), [expression], JSON.stringify(resource));
  }
});

test('bad cardinality refused: Patient.gender as array, missing Observation.status, empty array', () => {
  const issues = validateResource({ resourceType: 'Patient', gender: ['male'] });
  assert.deepEqual(expressions(issues), ['Patient.gender']);
  assert.match(issues[0]?.diagnostics ?? '', /cardinality/);
  assert.deepEqual(expressions(validateResource({ resourceType: 'Patient', name: { family: 'Zzyzx' } })), [
    'Patient.name',
  ]);
  const obs = syntheticObservation();
  delete obs['status'];
  assert.deepEqual(expressions(validateResource(obs)), ['Observation.status']);
  assert.deepEqual(expressions(validateResource({ resourceType: 'Patient', name: [] })), ['Patient.name']);
  assert.deepEqual(expressions(validateResource({ resourceType: 'Patient', gender: null })), [
    'Patient.gender',
  ]);
});

test('choice element: exactly one value[x]', () => {
  const issues = validateResource({
    resourceType: 'Patient',
    deceasedBoolean: true,
    deceasedDateTime: '2020-01-01',
  });
  assert.deepEqual(expressions(issues), ['Patient.deceased']);
  assert.deepEqual(expressions(validateResource({ ...syntheticObservation(), valueFoo: 1 })), [
    'Observation.valueFoo',
  ]);
});

test('required binding refused: gender banana, Observation.status, CodeableConcept bindings', () => {
  const issues = validateResource({ resourceType: 'Patient', gender: 'banana' });
  assert.deepEqual(expressions(issues), ['Patient.gender']);
  assert.equal(issues[0]?.code, 'code-invalid');
  assert.equal(issues[0]?.diagnostics, 'Value not in the required ValueSet');
  assert.deepEqual(expressions(validateResource({ ...syntheticObservation(), status: 'done' })), [
    'Observation.status',
  ]);
  assert.deepEqual(
    expressions(
      validateResource({
        resourceType: 'AllergyIntolerance',
        patient: { reference: 'Patient/1' },
        clinicalStatus: {
          coding: [
            { system: 'http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical', code: 'gone' },
          ],
        },
      }),
    ),
    ['AllergyIntolerance.clinicalStatus'],
  );
});

test('references: bad format and wrong target type refused, valid forms accepted', () => {
  for (const reference of [
    'not a reference',
    'Patient/',
    'Nope/1',
    'Organization/has space',
    'urn:uuid:not-a-uuid',
    'ftp//x',
  ]) {
    const issues = validateResource({ resourceType: 'Patient', managingOrganization: { reference } });
    assert.deepEqual(expressions(issues), ['Patient.managingOrganization.reference'], reference);
    assert.equal(issues[0]?.code, 'value');
  }
  const wrongType = validateResource({
    resourceType: 'Patient',
    managingOrganization: { reference: 'Patient/1' },
  });
  assert.equal(wrongType[0]?.diagnostics, 'Reference to a resource type not allowed here');
  assert.deepEqual(
    expressions(
      validateResource({ resourceType: 'Patient', managingOrganization: { reference: '#missing' } }),
    ),
    ['Patient.managingOrganization.reference'],
  );
  // A conditional reference only makes sense inside a transaction.
  assert.equal(
    validateResource({ resourceType: 'Patient', managingOrganization: { reference: 'Organization?name=x' } })
      .length,
    1,
  );
  for (const reference of [
    'Organization/org-1',
    'Organization/org-1/_history/3',
    'https://fhir.example.org/r4/Organization/org-1',
    'urn:uuid:3f2a9c1e-0000-4000-8000-000000000009',
    'urn:oid:1.2.3.4',
  ]) {
    assert.deepEqual(
      validateResource({ resourceType: 'Patient', managingOrganization: { reference } }),
      [],
      reference,
    );
  }
});

test('unknown resourceType refused', () => {
  for (const resource of [
    { resourceType: 'Nope' },
    { resourceType: 'patient' },
    { name: [] },
    { resourceType: 7 },
  ]) {
    const issues = validateResource(resource);
    assert.equal(issues.length, 1, JSON.stringify(resource));
    assert.equal(issues[0]?.severity, 'error');
  }
});

test('contained resources and Bundle entries are validated recursively', () => {
  const patient = syntheticPatient();
  patient['contained'] = [{ resourceType: 'Organization', id: 'org1', name: 'Test', foo: 1 }];
  assert.deepEqual(expressions(validateResource(patient)), ['Patient.contained[0].foo']);

  const bundle = syntheticBundle();
  (bundle['entry'] as { resource: Record<string, unknown> }[])[1]!.resource['status'] = 'banana';
  assert.deepEqual(expressions(validateResource(json(bundle))), ['Bundle.entry[1].resource.status']);

  const unreferenced = syntheticPatient();
  delete unreferenced['managingOrganization'];
  assert.deepEqual(expressions(validateResource(unreferenced)), ['Patient.contained[0]']);
  assert.equal(
    validateResource({ resourceType: 'Patient', contained: [{ resourceType: 'Nope', id: 'x' }] })[0]
      ?.expression,
    'Patient.contained[0]',
  );
});

test('spec invariants are checked (per-1, ext-1, ras-2)', () => {
  const per1 = validateResource({
    resourceType: 'Encounter',
    status: 'finished',
    class: { code: 'AMB' },
    period: { start: '2024-01-02', end: '2024-01-01' },
  });
  assert.deepEqual(expressions(per1), ['Encounter.period']);
  assert.match(per1[0]?.diagnostics ?? '', /per-1/);
  assert.deepEqual(
    expressions(
      validateResource({
        resourceType: 'Patient',
        extension: [
          { url: 'http://example.org/x', valueString: 'a', extension: [{ url: 'y', valueString: 'b' }] },
        ],
      }),
    ),
    ['Patient.extension[0]'],
  );
  assert.deepEqual(
    expressions(
      validateResource({
        resourceType: 'RiskAssessment',
        status: 'final',
        subject: { reference: 'Patient/1' },
        prediction: [{ probabilityDecimal: 101 }],
      }),
    ),
    ['RiskAssessment.prediction[0]'],
  );
});

test('narrative XHTML: namespace required, scripts refused', () => {
  const div = (d: string): IssueDetail[] =>
    validateResource({ resourceType: 'Patient', text: { status: 'generated', div: d } });
  assert.deepEqual(div('<div xmlns="http://www.w3.org/1999/xhtml">ok</div>'), []);
  assert.deepEqual(expressions(div('<div>no namespace</div>')), ['Patient.text.div']);
  assert.deepEqual(
    expressions(div('<div xmlns="http://www.w3.org/1999/xhtml"><script>x()</script>t</div>')),
    ['Patient.text.div'],
  );
  assert.deepEqual(
    expressions(div('<div xmlns="http://www.w3.org/1999/xhtml"><p onclick="x()">t</p></div>')),
    ['Patient.text.div'],
  );
});

test('no input value ever reaches the issues (canary values)', () => {
  const canaries = ['Canaryname', 'Zzyzx', '999-00-1234', 'SSN'];
  const inputs: unknown[] = [
    {
      resourceType: 'Patient',
      id: 'SSN 999-00-1234',
      name: 'Canaryname Zzyzx',
      gender: 'Canaryname Zzyzx',
      birthDate: 'SSN 999-00-1234',
      telecom: [{ system: 'Canaryname Zzyzx', value: 999001234 }],
      managingOrganization: { reference: 'Canaryname Zzyzx SSN 999-00-1234' },
      generalPractitioner: [{ reference: 'Canaryname/999-00-1234' }],
      'Canaryname Zzyzx': 'SSN 999-00-1234',
      'SSN-999-00-1234': true,
      CanarynameZzyzx: 1,
      contained: [
        { resourceType: 'CanarynameZzyzx', id: 'SSN99900' },
        { resourceType: 'Organization', id: 'SSN 999-00-1234' },
      ],
      text: { status: 'generated', div: '<div>Canaryname Zzyzx SSN 999-00-1234</div>' },
    },
    { resourceType: 'Canaryname Zzyzx SSN 999-00-1234' },
    {
      resourceType: 'Encounter',
      status: 'finished',
      class: { code: 'x' },
      period: { start: '2024-01-02', end: '2024-01-01' },
      identifier: [{ value: 'SSN 999-00-1234' }],
    },
    {
      resourceType: 'Observation',
      status: 'final',
      code: { text: 'Canaryname Zzyzx' },
      valueString: 'SSN 999-00-1234',
      valueBoolean: 'Canaryname Zzyzx',
    },
    'Canaryname Zzyzx SSN 999-00-1234',
    JSON.parse('{"resourceType":"Patient","__proto__":{"Canaryname Zzyzx":"SSN 999-00-1234"}}'),
  ];
  for (const input of inputs) {
    const issues = validateResource(input);
    assert.ok(issues.length > 0, JSON.stringify(input));
    const out = JSON.stringify(issues);
    for (const canary of canaries) {
      assert.ok(!out.toLowerCase().includes(canary.toLowerCase()), `${canary} leaked: ${out}`);
    }
  }
});

test('__proto__ and Object.prototype keys are refused, never thrown on, never pollute', () => {
  const input = JSON.parse(
    '{"resourceType":"Patient","__proto__":{"polluted":true},"name":[{"__proto__":{"polluted":true},"family":"Zzyzx"}],"constructor":{"prototype":{"polluted":true}},"toString":1}',
  ) as unknown;
  const issues = validateResource(input);
  assert.equal(issues.length, 4);
  assert.ok(
    issues.every((i) => i.code === 'structure'),
    JSON.stringify(issues),
  );
  assert.deepEqual(expressions(issues), [
    'Patient',
    'Patient.name[0]',
    'Patient.constructor',
    'Patient.toString',
  ]);
  assert.equal(({} as Record<string, unknown>)['polluted'], undefined);
});

test('never throws: odd values, deep nesting, cycles, hostile objects', () => {
  let deep: Record<string, unknown> = { url: 'http://example.org/x', valueString: 'leaf' };
  for (let i = 0; i < 20000; i++) deep = { url: 'http://example.org/x', extension: [deep] };
  const cyclic: Record<string, unknown> = { resourceType: 'Patient' };
  cyclic['contained'] = [cyclic];
  const hostile = new Proxy(
    {},
    {
      ownKeys() {
        throw new Error('boom');
      },
    },
  );
  const inputs: unknown[] = [
    null,
    undefined,
    42,
    'Patient',
    [],
    [{ resourceType: 'Patient' }],
    {},
    { resourceType: 'Patient', extension: [deep] },
    cyclic,
    hostile,
    { resourceType: 'Patient', name: [null] },
    { resourceType: 'Patient', _birthDate: [1] },
    { resourceType: 'Patient', multipleBirthInteger: Number.NaN },
    { resourceType: 'Bundle', type: 'collection', entry: [{ resource: null }, { resource: 'x' }, {}] },
  ];
  inputs.forEach((input, n) => {
    let issues: IssueDetail[] = [];
    assert.doesNotThrow(() => {
      issues = validateResource(input);
    }, `input ${n}`);
    assert.ok(issues.length > 0 && issues.length <= 101, `input ${n}: ${issues.length} issues`);
  });
});
