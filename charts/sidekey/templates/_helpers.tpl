{{- define "sidekey.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sidekey.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sidekey.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sidekey.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sidekey
{{- end -}}

{{- define "sidekey.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sidekey.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end -}}

{{- define "sidekey.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sidekey.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The injector's image: the chart's appVersion unless image.tag is set. */}}
{{- define "sidekey.injectorImage" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The agent image the injector adds to pods: agent.image verbatim when set, else
<agent.imageRepository>:<agent.imageTag or the chart's appVersion>. */}}
{{- define "sidekey.agentImage" -}}
{{- if .Values.agent.image -}}
{{- .Values.agent.image -}}
{{- else -}}
{{- printf "%s:%s" .Values.agent.imageRepository (.Values.agent.imageTag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "sidekey.webhookName" -}}
{{- printf "%s-webhook" (include "sidekey.fullname" .) -}}
{{- end -}}

{{/*
The Secret holding the serving certificate. Auto-TLS's Secret is created by the injector, not by
helm, so it has a name of its own: a later switch to tls.mode chart or certManager must not find a
Secret of that name that helm cannot adopt ("invalid ownership metadata").
*/}}
{{- define "sidekey.tlsSecretName" -}}
{{- if eq .Values.tls.mode "secret" -}}
{{- .Values.tls.secret.name -}}
{{- else if eq .Values.tls.mode "auto" -}}
{{- printf "%s-auto-tls" (include "sidekey.fullname" .) -}}
{{- else -}}
{{- printf "%s-tls" (include "sidekey.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "sidekey.serviceHost" -}}
{{- printf "%s.%s.svc" (include "sidekey.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/*
The chart-generated CA and serving certificate as JSON ({"ca", "cert", "key"}), reused across
upgrades when the Secret exists. tls.yaml (the Secret) and webhook.yaml (the caBundle) both include
this, and genCA is random: the first include of a render stores its result in the render's root
context, which every template of this chart shares, so both see the same CA.
*/}}
{{- define "sidekey.chartCerts" -}}
{{- if not (hasKey . "sidekeyChartCerts") -}}
{{- $_ := set . "sidekeyChartCerts" (include "sidekey.chartCertsOnce" .) -}}
{{- end -}}
{{- get . "sidekeyChartCerts" -}}
{{- end -}}

{{/* One generation (or lookup) of the chart certificates: include only through sidekey.chartCerts. */}}
{{- define "sidekey.chartCertsOnce" -}}
{{- $secretName := include "sidekey.tlsSecretName" . -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $secretName -}}
{{- if and $existing $existing.data (index $existing.data "ca.crt") -}}
{{- dict "ca" (index $existing.data "ca.crt" | b64dec) "cert" (index $existing.data "tls.crt" | b64dec) "key" (index $existing.data "tls.key" | b64dec) | toJson -}}
{{- else -}}
{{- $host := include "sidekey.serviceHost" . -}}
{{- $short := printf "%s.%s" (include "sidekey.fullname" .) .Release.Namespace -}}
{{- $ca := genCA "sidekey-injector-ca" (int .Values.tls.chart.validityDays) -}}
{{- $cert := genSignedCert $host nil (list $host $short (include "sidekey.fullname" .)) (int .Values.tls.chart.validityDays) $ca -}}
{{- dict "ca" $ca.Cert "cert" $cert.Cert "key" $cert.Key | toJson -}}
{{- end -}}
{{- end -}}
