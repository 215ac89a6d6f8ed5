/**
 * Scores src/fhir/validator.ts against the R4 subset of the HL7 validator test cases in
 * ../shared/data/fhir-test-cases/validator-r4 (see ../shared/data/fhir-test-cases/README.md).
 *
 *   node --import tsx bench/validator-score.ts
 *
 * Expected outcome per case: the manifest's errorCount when it has one, else whether the Java
 * reference validator's OperationOutcome (outcomes-java/) holds an error or fatal issue. XML
 * inputs are not applicable (the server takes JSON only). A body JSON.parse rejects counts as
 * caught, as the server answers it with 400. .ndjson inputs are validated line by line.
 * Prints the score as JSON on stdout and each disagreement on stderr.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { validateResource } from '../src/fhir/validator.ts';
import type { IssueDetail } from '../src/kernel/errors.ts';

interface ManifestCase {
  name: string;
  file: string;
  java?: string;
  errorCount?: number;
}

interface JavaIssue {
  severity?: string;
  expression?: string[];
  location?: string[];
  details?: { text?: string };
}

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const suite = join(root, '..', 'shared', 'data', 'fhir-test-cases', 'validator-r4');

/** Java writes `Bundle.entry[0].resource/*Patient/x*\/.gender` and `value.ofType(integer)`; we write `resource.gender` and `valueInteger`. */
function normalise(expr: string): string {
  return expr
    .replace(/\/\*.*?\*\//g, '')
    .replace(
      /\.(\w+)\.ofType\((\w+)\)/g,
      (_m, name: string, type: string) => `.${name}${type.charAt(0).toUpperCase()}${type.slice(1)}`,
    )
    .replace(/\.$/, '');
}

/** Ours name the missing or unknown child; Java names its parent. Both count. */
function ourCandidates(issues: IssueDetail[]): Set<string> {
  const out = new Set<string>();
  for (const i of issues) {
    if (!i.expression) continue;
    out.add(i.expression);
    if (/^(Unknown element|Missing required element)/.test(i.diagnostics ?? '')) {
      out.add(i.expression.replace(/\.[^.[\]]+$/, ''));
    }
  }
  return out;
}

function validateText(text: string, ndjson: boolean): { parsed: boolean; issues: IssueDetail[] } {
  const bodies = ndjson ? text.split('\n').filter((l) => l.trim() !== '') : [text];
  const issues: IssueDetail[] = [];
  for (const body of bodies) {
    let json: unknown;
    try {
      json = JSON.parse(body);
    } catch {
      return { parsed: false, issues: [] };
    }
    issues.push(...validateResource(json));
  }
  return { parsed: true, issues };
}

function main(): void {
  const manifestPath = join(suite, 'manifest-subset.json');
  if (!existsSync(manifestPath)) {
    console.log(`validator-score: ${suite} not found (shared data absent); nothing to score.`);
    return;
  }
  const manifest = JSON.parse(readFileSync(manifestPath, 'utf8')) as { 'test-cases': ManifestCase[] };
  const cases = manifest['test-cases'];
  const score = {
    cases: cases.length,
    applicable: 0,
    notApplicableXml: 0,
    agree: 0,
    agreeValid: 0,
    agreeInvalid: 0,
    falsePositives: 0,
    falseNegatives: 0,
    caughtByJsonParse: 0,
    expressionComparable: 0,
    expressionMatch: 0,
  };
  const disagreements: string[] = [];
  const expressionMisses: string[] = [];

  for (const c of cases) {
    if (c.file.endsWith('.xml')) {
      score.notApplicableXml++;
      continue;
    }
    const inputPath = join(suite, c.file);
    if (!existsSync(inputPath)) continue;
    score.applicable++;

    let javaErrors: JavaIssue[] = [];
    if (c.java && existsSync(join(suite, c.java))) {
      const outcome = JSON.parse(readFileSync(join(suite, c.java), 'utf8')) as { issue?: JavaIssue[] };
      javaErrors = (outcome.issue ?? []).filter((i) => i.severity === 'error' || i.severity === 'fatal');
    }
    const expectInvalid = c.errorCount !== undefined ? c.errorCount > 0 : javaErrors.length > 0;

    const { parsed, issues } = validateText(readFileSync(inputPath, 'utf8'), c.file.endsWith('.ndjson'));
    const weInvalid = !parsed || issues.length > 0;
    if (!parsed) score.caughtByJsonParse++;

    if (weInvalid === expectInvalid) {
      score.agree++;
      if (weInvalid) score.agreeInvalid++;
      else score.agreeValid++;
    } else if (weInvalid) {
      score.falsePositives++;
    } else {
      score.falseNegatives++;
    }
    const describe = (): string =>
      [
        `  ours: ${
          parsed
            ? issues
                .slice(0, 6)
                .map((i) => `${i.expression ?? '-'} (${i.diagnostics ?? ''})`)
                .join('; ') || 'valid'
            : 'JSON.parse failed'
        }`,
        `  java: ${
          javaErrors
            .slice(0, 6)
            .map(
              (i) => `${(i.expression ?? i.location ?? ['-'])[0]} (${(i.details?.text ?? '').slice(0, 110)})`,
            )
            .join('; ') || 'valid'
        }`,
      ].join('\n');
    if (weInvalid !== expectInvalid) {
      disagreements.push(
        `${c.name} [${c.file}] expected ${expectInvalid ? 'invalid' : 'valid'}, ours ${weInvalid ? 'invalid' : 'valid'}\n${describe()}`,
      );
    }

    if (weInvalid && expectInvalid && parsed) {
      const theirs = new Set(javaErrors.flatMap((i) => i.expression ?? []).map(normalise));
      if (theirs.size > 0) {
        score.expressionComparable++;
        const ours = ourCandidates(issues);
        if ([...ours].some((e) => theirs.has(e))) score.expressionMatch++;
        else expressionMisses.push(`${c.name}\n${describe()}`);
      }
    }
  }

  console.log(JSON.stringify(score, null, 2));
  console.error(`\n${disagreements.length} disagreement(s):`);
  for (const d of disagreements) console.error(d);
  console.error(`\n${expressionMisses.length} agreed-invalid case(s) with no matching expression:`);
  for (const d of expressionMisses) console.error(d);
}

main();
