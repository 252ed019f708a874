// Step-up (RFC 9470) as pure functions: reading an API's challenge, checking a sign-in against a
// requirement, and a login's query. The examples pin the RFC's own shapes; the properties feed the
// challenge reader what hostile or broken APIs send and check that only checked values come out.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { requestedStepUp, silentLoginRefusal, withStepUpFloor } from '../../lib/auth.ts';
import { GatehouseError, errorBody, errors } from '../../lib/errors.ts';
import { ACR_VALUE, MAX_AGE_LIMIT_SEC, missingAuthentication, parseAcrValues, parseMaxAge, refusesTheToken, stepUpChallenge, stepUpDetails } from '../../lib/step-up.ts';

const RUNS = 2000;
const headers = (...values: string[]) => values.flatMap((value) => ['WWW-Authenticate', value]);

describe('stepUpChallenge', () => {
  it('reads RFC 9470 section 3 challenges: acr_values, max_age, both', async () => {
    expect(
      await stepUpChallenge(headers('Bearer error="insufficient_user_authentication", error_description="A different authentication level is required", acr_values="myACR"')),
    ).toEqual({ acrValues: ['myACR'], dropped: [] });
    expect(await stepUpChallenge(headers('Bearer error="insufficient_user_authentication", error_description="More recent authentication is required", max_age="5"'))).toEqual({
      maxAge: 5,
      dropped: [],
    });
    expect(await stepUpChallenge(['www-authenticate', 'bearer ERROR=insufficient_user_authentication, max_age=0, acr_values="urn:a urn:b  urn:a"'])).toEqual({
      acrValues: ['urn:a', 'urn:b'],
      maxAge: 0,
      dropped: [],
    });
    // Neither said: a step-up all the same (a fresh sign-in may be all the API wants).
    expect(await stepUpChallenge(headers('Bearer error="insufficient_user_authentication"'))).toEqual({ dropped: [] });
  });

  it('finds the challenge in the scheme the token went in (Bearer, or DPoP for a DPoP API) among several, in one field or in several', async () => {
    const dpopFirst = 'DPoP algs="ES256", error="insufficient_user_authentication", acr_values="dpop-acr", Bearer realm="api", error="insufficient_user_authentication", acr_values="gold"';
    expect(await stepUpChallenge(headers(dpopFirst))).toEqual({ acrValues: ['gold'], dropped: [] });
    expect(await stepUpChallenge(headers(dpopFirst), 'dpop')).toEqual({ acrValues: ['dpop-acr'], dropped: [] });
    // For a DPoP token, one in the Bearer scheme counts too (an API that takes both may say it so); not the other way round.
    expect(await stepUpChallenge(headers('Bearer error="insufficient_user_authentication", acr_values="gold"'), 'dpop')).toEqual({ acrValues: ['gold'], dropped: [] });
    expect(await stepUpChallenge(headers('DPoP error="insufficient_user_authentication", acr_values="gold"'))).toBeUndefined();
    expect(await stepUpChallenge(headers('Basic realm="x"', 'Bearer error="insufficient_user_authentication", max_age=60'))).toEqual({ maxAge: 60, dropped: [] });
  });

  it('is not a step-up: other errors, other schemes, no challenge, unreadable challenges', async () => {
    for (const value of [
      'Bearer error="invalid_token"',
      'Bearer error="insufficient_scope", scope="admin"',
      'Bearer realm="api"',
      'Bearer',
      'Basic realm="insufficient_user_authentication"',
      'DPoP error="insufficient_user_authentication", acr_values="x"',
      'Bearer error="insufficient_user_authentication',
      'Bearer error=insufficient_user_authentication, acr_values=urn:unquoted:colon',
      '',
      ',,,',
    ]) {
      expect(await stepUpChallenge(headers(value)), value).toBeUndefined();
    }
    expect(await stepUpChallenge(['content-type', 'text/plain'])).toBeUndefined();
    expect(await stepUpChallenge(headers(`Bearer error="insufficient_user_authentication", acr_values="${'a'.repeat(17_000)}"`))).toBeUndefined();
  });

  it('drops values in a shape it does not pass on, and says which', async () => {
    expect(await stepUpChallenge(headers('Bearer error="insufficient_user_authentication", acr_values="<script>", max_age="-1"'))).toEqual({ dropped: ['acr_values', 'max_age'] });
    expect(await stepUpChallenge(headers('Bearer error="insufficient_user_authentication", acr_values="a\\"b", max_age="1e3"'))).toEqual({ dropped: ['acr_values', 'max_age'] });
    expect(await stepUpChallenge(headers(`Bearer error="insufficient_user_authentication", max_age=${MAX_AGE_LIMIT_SEC + 1}`))).toEqual({ dropped: ['max_age'] });
  });
});

// ---------------------------------------------------------------------------------------------
// Generated challenges.

const FIXED_MESSAGE = errors.stepUpRequired({}).message;
/** What header attacks and broken APIs are made of: quotes, escapes, separators, controls, non-ASCII. */
const PIECES = ['"', '\\', ',', ' ', '=', ';', '\t', '\r\n', '\u0000', '\u007f', 'é', '\u2028', '<script>', '}', '{', '%22', 'urn:x', 'gold', '0', '-1', '9'.repeat(12)];
const noisy = fc.array(fc.oneof(fc.constantFrom(...PIECES), fc.string({ maxLength: 4 }), fc.string({ unit: 'binary', maxLength: 3 })), { maxLength: 6 }).map((parts) => parts.join(''));
const acrLike = fc.stringMatching(/^[A-Za-z0-9._~:/?#@!$&'()*+,;=%-]{1,12}$/);
/** Mostly lists an API could mean, some with a hostile piece among them, some pure noise. */
const acrText = fc.oneof(
  { weight: 3, arbitrary: fc.array(fc.oneof({ weight: 4, arbitrary: acrLike }, { weight: 1, arbitrary: fc.constantFrom(...PIECES) }), { minLength: 1, maxLength: 4 }).map((parts) => parts.join(' ')) },
  { weight: 1, arbitrary: noisy },
);
const maxAgeText = fc.oneof(
  { weight: 3, arbitrary: fc.nat({ max: 10_000_000 }).map(String) },
  { weight: 1, arbitrary: fc.constantFrom('-1', '1e3', '1.5', '0x1f', '99999999999', ' 7', '') },
  { weight: 1, arbitrary: noisy },
);
const quoted = (value: string, escape: boolean) => `"${escape ? value.replace(/[\\"]/g, '\\$&') : value}"`;
/** A challenge an API could send, its parameters in any order and quoting, with noise where it hurts. */
const challengeText = fc
  .record({
    scheme: fc.oneof({ weight: 4, arbitrary: fc.constantFrom('Bearer', 'bearer', 'BEARER') }, { weight: 1, arbitrary: fc.constantFrom('DPoP', 'Basic') }),
    error: fc.oneof({ weight: 4, arbitrary: fc.constant('insufficient_user_authentication') }, { weight: 1, arbitrary: fc.constantFrom('invalid_token', 'insufficient_scope') }),
    acr: fc.option(acrText),
    maxAge: fc.option(maxAgeText),
    description: fc.option(noisy),
    quoteAll: fc.boolean(),
    escape: fc.oneof({ weight: 4, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
    tail: fc.oneof({ weight: 8, arbitrary: fc.constant('') }, { weight: 1, arbitrary: noisy }),
  })
  .chain(({ scheme, error, acr, maxAge, description, quoteAll, escape, tail }) => {
    const params = [
      `error=${quoteAll ? quoted(error, escape) : error}`,
      ...(acr === null ? [] : [`acr_values=${quoted(acr, escape)}`]),
      ...(maxAge === null ? [] : [`max_age=${quoteAll ? quoted(maxAge, escape) : maxAge}`]),
      ...(description === null ? [] : [`error_description=${quoted(description, escape)}`]),
    ];
    return fc.shuffledSubarray(params, { minLength: params.length }).map((shuffled) => `${scheme} ${shuffled.join(', ')}${tail}`);
  });

describe('refusesTheToken: whether a 401 is worth a new token', () => {
  it('is when the challenge in the token’s scheme names no error or invalid_token, or there is none; not when it asks for anything else', async () => {
    for (const [value, scheme, expected] of [
      [undefined, 'bearer', true],
      ['Bearer realm="api"', 'bearer', true],
      ['Bearer error="invalid_token", error_description="expired"', 'bearer', true],
      ['Basic realm="x"', 'bearer', true],
      ['Bearer error="insufficient_scope", scope="admin"', 'bearer', false],
      ['Bearer error="insufficient_user_authentication", acr_values="gold"', 'bearer', false],
      ['DPoP algs="ES256", error="invalid_token"', 'dpop', true],
      ['DPoP algs="ES256", error="invalid_dpop_proof"', 'dpop', false],
      ['DPoP algs="ES256", error="use_dpop_nonce"', 'dpop', false],
      // Another scheme's words are not about the token that went.
      ['DPoP algs="ES256", error="invalid_dpop_proof"', 'bearer', true],
      ['Bearer error="insufficient_scope"', 'dpop', true],
    ] as const) {
      expect(await refusesTheToken(value === undefined ? [] : headers(value), scheme), `${value} (${scheme})`).toBe(expected);
    }
  });
});

describe('stepUpChallenge (generated values)', () => {
  it('never throws; whatever it returns passes the checks, and the JSON answer carries nothing else of the API’s', async () => {
    const seen = { stepUps: 0, acrValues: 0, maxAges: 0, dropped: 0 };
    await fc.assert(
      fc.asyncProperty(challengeText, fc.array(fc.oneof(challengeText, noisy, fc.string({ unit: 'binary', maxLength: 40 })), { maxLength: 2 }), async (first, more) => {
        const challenge = await stepUpChallenge(headers(first, ...more));
        if (!challenge) return;
        seen.stepUps++;
        if (challenge.acrValues) seen.acrValues++;
        if (challenge.maxAge !== undefined) seen.maxAges++;
        if (challenge.dropped.length) seen.dropped++;
        for (const value of challenge.acrValues ?? []) expect(value).toMatch(ACR_VALUE);
        if (challenge.maxAge !== undefined) {
          expect(Number.isSafeInteger(challenge.maxAge)).toBe(true);
          expect(challenge.maxAge).toBeGreaterThanOrEqual(0);
        }
        const body = JSON.parse(errorBody(errors.stepUpRequired(stepUpDetails(challenge)))) as Record<string, unknown>;
        expect(Object.keys(body).filter((key) => !['acr_values', 'max_age'].includes(key))).toEqual(['error', 'message']);
        expect(body).toMatchObject({ error: 'step_up_required', message: FIXED_MESSAGE });
        if (typeof body.acr_values === 'string') expect(body.acr_values.split(' ')).toEqual(challenge.acrValues);
      }),
      { numRuns: RUNS },
    );
    // The generator must keep reaching every branch, or the property proves little.
    for (const [branch, count] of Object.entries(seen)) expect(count, branch).toBeGreaterThan(RUNS / 50);
  });

  it('a challenge whose acr_values are all ACR values is read whole, whatever else it says', async () => {
    const acr = fc.stringMatching(/^[A-Za-z0-9._~:/?#@!$&'()*+,;=%-]{1,20}$/);
    await fc.assert(
      fc.asyncProperty(fc.uniqueArray(acr, { minLength: 1, maxLength: 8 }), fc.nat({ max: 1_000_000 }), noisy, async (acrs, maxAge, description) => {
        const quotedDescription = description.replace(/[\\"]/g, '\\$&').replace(/[^\x20-\x7e]/g, '');
        const value = `Bearer error="insufficient_user_authentication", error_description="${quotedDescription}", acr_values="${acrs.join(' ')}", max_age=${maxAge}`;
        expect(await stepUpChallenge(headers(value))).toEqual({ acrValues: acrs, maxAge, dropped: [] });
      }),
      { numRuns: RUNS },
    );
  });
});

describe('parseAcrValues and parseMaxAge', () => {
  it('accept URI-character ACRs and whole seconds only', () => {
    expect(parseAcrValues('urn:mace:incommon:iap:silver http://schemas.openid.net/pape/policies/2007/06/multi-factor 1')).toHaveLength(3);
    for (const bad of ['', ' ', 'a\tb', 'a"b', 'a<b', 'é', 'x'.repeat(129), Array.from({ length: 9 }, (_, i) => `a${i}`).join(' ')]) expect(parseAcrValues(bad), bad).toBeUndefined();
    expect(parseMaxAge('0')).toBe(0);
    expect(parseMaxAge('300')).toBe(300);
    for (const bad of ['', '-1', '1.5', '1e3', ' 1', '0x10', '99999999999']) expect(parseMaxAge(bad), bad).toBeUndefined();
  });
});

describe('missingAuthentication', () => {
  const now = 1_000_000;
  it('is met by any one of the ACRs and a recent enough sign-in', () => {
    expect(missingAuthentication({}, {}, now)).toBeUndefined();
    expect(missingAuthentication({ acrValues: ['mfa', 'hwk'] }, { acr: 'hwk' }, now)).toBeUndefined();
    expect(missingAuthentication({ maxAge: 60 }, { authTime: now - 60 }, now)).toBeUndefined();
  });
  it('asks for the whole requirement when any part is lacking, an unknown ACR or time included', () => {
    expect(missingAuthentication({ acrValues: ['mfa'] }, { acr: 'pwd' }, now)).toEqual({ acrValues: ['mfa'] });
    expect(missingAuthentication({ acrValues: ['mfa'] }, {}, now)).toEqual({ acrValues: ['mfa'] });
    expect(missingAuthentication({ maxAge: 60 }, { authTime: now - 61 }, now)).toEqual({ maxAge: 60 });
    expect(missingAuthentication({ maxAge: 60 }, {}, now)).toEqual({ maxAge: 60 });
    expect(missingAuthentication({ acrValues: ['mfa'], maxAge: 60 }, { acr: 'mfa', authTime: now - 61 }, now)).toEqual({ acrValues: ['mfa'], maxAge: 60 });
  });
});

describe('requestedStepUp (login query)', () => {
  const query = (text: string) => requestedStepUp(new URLSearchParams(text));
  it('reads acr_values and max_age', () => {
    expect(query('returnTo=/x')).toEqual({});
    expect(query('acr_values=urn%3Agatehouse%3Amfa+gold&max_age=0')).toEqual({ acrValues: ['urn:gatehouse:mfa', 'gold'], maxAge: 0 });
  });
  it.each(['acr_values=', 'acr_values=%22x%22', 'acr_values=a&acr_values=b', 'max_age=', 'max_age=-5', 'max_age=soon', 'max_age=1&max_age=2'])('refuses %s with invalid_request', (text) => {
    let caught: unknown;
    try {
      query(text);
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(GatehouseError);
    expect(caught).toMatchObject({ code: 'invalid_request', status: 400 });
  });
});

describe('a login link cannot lower what OIDC_AUTHORIZATION_PARAMS asks of every sign-in', () => {
  const floor: Array<[string, string]> = [['acr_values', 'urn:mfa urn:hwk'], ['max_age', '600'], ['audience', 'x']];
  const refusal = (stepUp: Parameters<typeof withStepUpFloor>[0], configured = floor) => {
    try {
      withStepUpFloor(stepUp, configured);
      return undefined;
    } catch (error) {
      return error;
    }
  };
  it('accepts narrowing: fewer of the same ACRs, a shorter max_age, or nothing', () => {
    for (const stepUp of [{}, { acrValues: ['urn:mfa'] }, { acrValues: ['urn:hwk', 'urn:mfa'] }, { maxAge: 0 }, { maxAge: 600 }]) expect(refusal(stepUp)).toBeUndefined();
    // Without a floor, a link may ask for anything valid.
    expect(refusal({ acrValues: ['urn:pwd'], maxAge: 10 ** 9 }, [])).toBeUndefined();
  });
  it('refuses any ACR outside the floor and any longer max_age, whatever the link adds', () => {
    fc.assert(
      fc.property(fc.array(fc.stringMatching(ACR_VALUE), { minLength: 1, maxLength: 8 }), fc.integer({ min: 601, max: MAX_AGE_LIMIT_SEC }), (acrs, maxAge) => {
        const lowering = acrs.some((acr) => acr !== 'urn:mfa' && acr !== 'urn:hwk');
        if (lowering) expect(refusal({ acrValues: acrs })).toMatchObject({ code: 'invalid_request', status: 400 });
        expect(refusal({ maxAge })).toMatchObject({ code: 'invalid_request', status: 400 });
      }),
    );
    expect(refusal({ acrValues: ['urn:pwd'] })).toMatchObject({ code: 'invalid_request' });
    expect(refusal({ acrValues: ['urn:mfa', 'urn:pwd'] })).toMatchObject({ code: 'invalid_request' });
  });
});

describe('what OIDC_AUTHORIZATION_PARAMS asks of every sign-in is what the callback holds it to', () => {
  it('a login that asks for nothing of its own asks for the floor, which the callback then checks', () => {
    expect(withStepUpFloor({}, [['acr_values', 'urn:mfa  urn:hwk'], ['max_age', '600'], ['audience', 'x']])).toEqual({ acrValues: ['urn:mfa', 'urn:hwk'], maxAge: 600 });
    expect(withStepUpFloor({}, [['max_age', '0']])).toEqual({ maxAge: 0 });
    // A link that narrows the floor keeps its own values; the rest of the floor still applies.
    expect(withStepUpFloor({ acrValues: ['urn:hwk'] }, [['acr_values', 'urn:mfa urn:hwk'], ['max_age', '600']])).toEqual({ acrValues: ['urn:hwk'], maxAge: 600 });
    expect(withStepUpFloor({ maxAge: 60 }, [['acr_values', 'urn:mfa'], ['max_age', '600']])).toEqual({ acrValues: ['urn:mfa'], maxAge: 60 });
    // No floor: the link's own, or nothing (an ordinary login).
    expect(withStepUpFloor({}, [['audience', 'x']])).toEqual({});
    expect(withStepUpFloor({ acrValues: ['urn:pwd'] }, [])).toEqual({ acrValues: ['urn:pwd'] });
    // Start-up refuses a max_age that is no whole number of seconds (config.test.ts); none is a floor here.
    expect(withStepUpFloor({}, [['max_age', 'soon']])).toEqual({});
  });
  it('whatever the link asks, the result never asks for less than the floor', () => {
    fc.assert(
      fc.property(
        fc.option(fc.array(fc.constantFrom('urn:mfa', 'urn:hwk', 'urn:pwd'), { minLength: 1, maxLength: 3 }), { nil: undefined }),
        fc.option(fc.integer({ min: 0, max: 2_000 }), { nil: undefined }),
        (acrValues, maxAge) => {
          const floor: Array<[string, string]> = [['acr_values', 'urn:mfa urn:hwk'], ['max_age', '600']];
          let result;
          try {
            result = withStepUpFloor({ ...(acrValues ? { acrValues } : {}), ...(maxAge !== undefined ? { maxAge } : {}) }, floor);
          } catch {
            return; // refused: nothing is asked of the IdP at all
          }
          expect(result.acrValues?.length).toBeGreaterThan(0);
          expect(result.acrValues?.every((acr) => acr === 'urn:mfa' || acr === 'urn:hwk')).toBe(true);
          expect(result.maxAge).toBeLessThanOrEqual(600);
        },
      ),
    );
  });
  it('a silent login cannot stand in for a prompt the operator asks of every sign-in', () => {
    expect(silentLoginRefusal([['prompt', 'login']])).toBe('login_required');
    expect(silentLoginRefusal([['prompt', 'consent']])).toBe('consent_required');
    expect(silentLoginRefusal([['prompt', 'select_account consent']])).toBe('consent_required');
    expect(silentLoginRefusal([['prompt', 'select_account']])).toBe('account_selection_required');
    expect(silentLoginRefusal([['prompt', 'create']])).toBe('interaction_required');
    expect(silentLoginRefusal([['prompt', 'none']])).toBeUndefined();
    expect(silentLoginRefusal([['access_type', 'offline']])).toBeUndefined();
  });
});
